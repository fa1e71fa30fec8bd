"""Pure loss functions and log-prob helpers shared by the trainers (online DPO first).

Inputs: tensors of summed sequence log-probabilities (policy and reference,
chosen and rejected) or logits with label masks. Outputs: loss tensors and
plain metric tensors; nothing here touches models, optimizers or files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def dpo_loss(policy_chosen: "torch.Tensor", policy_rejected: "torch.Tensor", ref_chosen: "torch.Tensor",
             ref_rejected: "torch.Tensor", beta: float = 0.1, label_smoothing: float = 0.0) -> dict[str, "torch.Tensor"]:
    """Sigmoid DPO loss (Rafailov et al. 2023) on summed sequence log-probs, per pair.

    ``loss = -(1-eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)`` with
    ``h = (pc - rc) - (pr - rr)``. Returns ``loss`` (per pair), ``chosen_reward``
    and ``rejected_reward`` (``beta * (policy - ref)``) and ``margin`` (their difference).
    """
    import torch.nn.functional as F

    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    h = chosen - rejected
    loss = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return {"loss": loss, "chosen_reward": chosen.detach(), "rejected_reward": rejected.detach(), "margin": h.detach()}


def token_logprobs(logits: "torch.Tensor", labels: "torch.Tensor") -> "torch.Tensor":
    """Log-prob of ``labels[:, t]`` under ``logits[:, t]`` (same length; shift before calling)."""
    import torch

    return torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)


def sequence_logprobs(logits: "torch.Tensor", input_ids: "torch.Tensor", loss_mask: "torch.Tensor") -> "torch.Tensor":
    """Summed log-prob of the tokens where ``loss_mask`` is 1, for a causal LM's ``logits`` on ``input_ids``.

    ``loss_mask[:, t]`` marks token t as part of the response; the log-prob of
    token t comes from the logits at position t-1.
    """
    lp = token_logprobs(logits[:, :-1], input_ids[:, 1:])
    return (lp * loss_mask[:, 1:].to(lp.dtype)).sum(-1)
