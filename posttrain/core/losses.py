"""Losses and the project's one log-probability implementation.

Inputs: logits with labels, or a model with ``(token ids, prompt length)`` sequences. Outputs:
per-token log-probs (``token_logprobs``: the single place a log-softmax is gathered), summed
response log-probs (``sequence_logprobs``, ``response_logprobs``: online DPO, evaluation's KL),
probe log-probs (``probe_logprobs``: weight-sync checks and the hf sampler), the sigmoid DPO
loss, and the full-logits LM loss used as the chunked loss's benchmark baseline. Nothing here
touches optimizers or files.
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


def pad_responses(seqs: "list[tuple[list[int], int]]", pad: int, device: str = "cpu"
                  ) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
    """Right-padded ``(input_ids, attention_mask, response_mask)`` for ``(token ids, prompt length)`` pairs."""
    import torch

    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    resp = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, plen) in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        att[i, :len(s)] = 1
        resp[i, plen:len(s)] = 1
    return ids.to(device), att.to(device), resp.to(device)


def response_logprobs(model: "torch.nn.Module", seqs: "list[tuple[list[int], int]]", pad: int, device: str,
                      batch_size: int | None = None) -> "torch.Tensor":
    """Summed log-prob of each response (tokens after the prompt) under ``model``: one value per sequence.

    ``seqs`` are ``(prompt + response token ids, prompt length)``. Gradients follow the caller
    (wrap in ``torch.no_grad()`` for a reference model); ``batch_size`` bounds the forward batch.
    """
    import torch

    step = batch_size or len(seqs)
    outs = []
    for s in range(0, len(seqs), step):
        ids, att, resp = pad_responses(seqs[s:s + step], pad, device)
        logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits
        outs.append(sequence_logprobs(logits, ids, resp))
    return torch.cat(outs)


def probe_logprobs(model: "torch.nn.Module", token_ids: list[int], device: str) -> list[float]:
    """Log-probability of each ``token_ids[i]`` (i >= 1) given the tokens before it (no gradient)."""
    import torch

    ids = torch.tensor([token_ids], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    return token_logprobs(logits[:, :-1], ids[:, 1:])[0].cpu().tolist()


def full_logits_lm_loss(model: "torch.nn.Module", inputs: dict, num_items_in_batch: "torch.Tensor | int | None",
                        scale: float = 1.0) -> "torch.Tensor":
    """Plain cross-entropy over the full ``tokens x vocab`` logits (the benchmark baseline of the chunked loss).

    Labels are shifted, not the logits (slicing the logits would copy the whole tensor once more).
    """
    import torch

    labels = inputs["labels"]
    kw = {k: v for k, v in inputs.items() if k != "labels"}
    kw["use_cache"] = False
    logits = model(**kw).logits.float()
    tgt = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), tgt.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    n = num_items_in_batch if num_items_in_batch is not None else tgt.ne(-100).sum()
    return loss / torch.as_tensor(n).clamp(min=1) * scale
