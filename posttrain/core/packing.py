"""Padding-free packing of preference pairs, and per-sequence log-probs / scores read from a packed row.

Inputs: the tokenized pairs of one micro-batch (``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``
for DPO, ``chosen_ids`` / ``rejected_ids`` for a reward model) and a Hugging Face causal LM or
sequence classifier (PEFT-wrapped or not, under DDP / DeepSpeed or not).

Outputs:

* ``pack_sequences`` / ``PreferencePacker`` / ``PairPacker``: one flat row holding every chosen
  sequence then every rejected sequence of the micro-batch (the order of TRL's padded batches),
  with ``position_ids`` restarting at 0 for each sequence and ``cu_seq_lens`` (cumulative lengths,
  the flash-attention varlen convention). Nothing is padded, so no compute goes to pad tokens.
* ``enable_packed_forward``: gives the model a packed path, ``model(input_ids=, position_ids=,
  cu_seq_lens=, completion_mask=)``, run *through* the model's own ``forward`` so DDP, DeepSpeed
  (ZeRO-3 parameter gathering) and PEFT see an ordinary call. The trunk runs once over the row
  (per-document attention: ``sdpa_varlen`` on CPU, flash-attention varlen on GPU; sdpa/eager
  build a block-diagonal mask from the position ids), then
  - causal LM (``completion_mask`` given): summed log-probs of each sequence's completion tokens,
    computed only at those positions with TRL's chunked LM-head kernel (the one TRL's padded DPO
    uses; it never materialises ``tokens x vocab`` logits), plus the per-sequence entropy, mean
    logit and top-1 counts TRL logs, and the MoE router loss when asked;
  - sequence classifier: the score head at each sequence's last token, the token
    ``reward.scorer`` and a right-padded batch pool at.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

KERNEL_VOCAB_CHUNK = 32768  # vocabulary columns per tile of the chunked LM-head kernel (TRL's value)


# ---------------------------------------------------------------- packing

def pack_sequences(seqs: list[list[int]], masks: list[list[int]] | None = None) -> dict[str, Any]:
    """One padding-free row from token sequences.

    Returns ``input_ids`` and ``position_ids`` of shape ``[1, T]`` (T = total tokens),
    ``cu_seq_lens`` (int32, ``[n + 1]``: sequence i spans ``cu[i]:cu[i+1]``) and, with ``masks``
    (one 0/1 list per sequence, 1 = completion token), ``completion_mask`` ``[1, T]``.
    """
    import torch

    if not seqs:
        raise ValueError("pack_sequences: no sequences")
    if any(len(s) == 0 for s in seqs):
        raise ValueError("pack_sequences: an empty sequence cannot be packed")
    if masks is not None and [len(m) for m in masks] != [len(s) for s in seqs]:
        raise ValueError("pack_sequences: each mask must be as long as its sequence")
    lens = [len(s) for s in seqs]
    out = {
        "input_ids": torch.tensor([t for s in seqs for t in s], dtype=torch.long).unsqueeze(0),
        "position_ids": torch.cat([torch.arange(n, dtype=torch.long) for n in lens]).unsqueeze(0),
        "cu_seq_lens": torch.tensor([0, *lens], dtype=torch.int32).cumsum(0, dtype=torch.int32),
    }
    if masks is not None:
        out["completion_mask"] = torch.tensor([v for m in masks for v in m], dtype=torch.long).unsqueeze(0)
    return out


def truncate(ids: list[int], mask: list[int], max_length: int | None, mode: str) -> tuple[list[int], list[int]]:
    """Cut one prompt+completion to ``max_length`` the way TRL's preference collator does."""
    if max_length is None or len(ids) <= max_length:
        return ids, mask
    if mode == "keep_start":
        return ids[:max_length], mask[:max_length]
    if mode == "keep_end":
        return ids[-max_length:], mask[-max_length:]
    raise ValueError(f"truncation_mode must be keep_start or keep_end, not {mode!r}")


@dataclass
class PreferencePacker:
    """Collator for DPO: ``{prompt_ids, chosen_ids, rejected_ids[, ref_*_logps]}`` rows -> one packed row.

    Sequences are prompt+chosen for every pair, then prompt+rejected for every pair, each truncated
    like TRL's ``DataCollatorForPreference`` (per sequence, ``truncation_mode``); the completion mask
    marks the chosen/rejected tokens. Precomputed reference log-probs pass through as ``[B]`` tensors.
    """

    max_length: int | None = None
    truncation_mode: str = "keep_start"

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Pack one micro-batch."""
        import torch

        seqs, masks = [], []
        for side in ("chosen_ids", "rejected_ids"):
            for ex in examples:
                ids = list(ex["prompt_ids"]) + list(ex[side])
                mask = [0] * len(ex["prompt_ids"]) + [1] * len(ex[side])
                ids, mask = truncate(ids, mask, self.max_length, self.truncation_mode)
                seqs.append(ids)
                masks.append(mask)
        out = pack_sequences(seqs, masks)
        for k in ("ref_chosen_logps", "ref_rejected_logps"):
            if k in examples[0]:
                out[k] = torch.tensor([ex[k] for ex in examples])
        return out


@dataclass
class PairPacker:
    """Collator for reward models: ``{chosen_ids, rejected_ids[, margin]}`` rows -> one packed row."""

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Pack one micro-batch: every chosen sequence, then every rejected one."""
        import torch

        out = pack_sequences([list(ex["chosen_ids"]) for ex in examples] +
                             [list(ex["rejected_ids"]) for ex in examples])
        if "margin" in examples[0]:
            out["margin"] = torch.tensor([float(ex["margin"]) for ex in examples], dtype=torch.float)
        return out


# ---------------------------------------------------------------- reading a packed row

def last_token_index(cu_seq_lens: Any) -> Any:
    """Row index of each sequence's last token (where a sequence classifier is read)."""
    return cu_seq_lens[1:].long() - 1


def completion_targets(input_ids: Any, completion_mask: Any, cu_seq_lens: Any) -> tuple[Any, Any]:
    """``(positions, sequence index)`` of the tokens whose log-prob counts, in a flat ``[T]`` row.

    Token t counts when it is a completion token and not the first token of its sequence (its
    log-prob comes from position t-1, which in a packed row must belong to the same sequence;
    the padded path likewise never scores position 0).
    """
    import torch

    cu = cu_seq_lens.long()
    keep = completion_mask.bool().clone()
    keep[cu[:-1]] = False
    pos = keep.nonzero().squeeze(-1)
    seq = torch.searchsorted(cu[1:], pos, right=True)
    return pos, seq


def _logit_transform(config: Any) -> tuple[float | None, float]:
    """(final logit soft-cap, logit scale) of a causal LM's config; refuses scalings the kernel is not given."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(text, name, None) is not None:
            raise ValueError(f"packed log-probs: models with `{name}` are not supported (use padding)")
    scale = getattr(text, "logit_scale", None)
    return getattr(text, "final_logit_softcapping", None), 1.0 if scale is None else float(scale)


def packed_logprobs(hidden: Any, lm_head: Any, input_ids: Any, completion_mask: Any, cu_seq_lens: Any,
                    config: Any) -> dict[str, Any]:
    """Per-sequence sums over completion tokens of a packed row: ``logps`` (with gradient), ``entropy``,
    ``mean_logits``, ``top1`` and ``tokens`` (detached), each ``[n]``.

    ``hidden`` is the trunk's ``[T, H]`` output; only the rows that predict a completion token go
    through the LM head, in tiles (TRL's ``ChunkedLogProbFunction``), so memory stays bounded for
    large vocabularies.
    """
    import torch
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    n = cu_seq_lens.numel() - 1
    pos, seq = completion_targets(input_ids, completion_mask, cu_seq_lens)
    zeros = hidden.new_zeros(n, dtype=torch.float32)
    out = {"tokens": zeros.index_add(0, seq, torch.ones_like(pos, dtype=torch.float32))}
    if pos.numel() == 0:
        # keep the result attached to the graph: an all-prompt micro-batch contributes a zero gradient
        out.update(logps=zeros + 0.0 * hidden.sum(), entropy=zeros, mean_logits=zeros, top1=zeros)
        return out
    softcap, scale = _logit_transform(config)
    weight, bias = lm_head.weight, lm_head.bias
    h = hidden[pos - 1]
    with maybe_gather_lm_head_ctx(weight, bias):
        lp, ent, _, mean_logit, top1 = ChunkedLogProbFunction.apply(
            h, weight, bias, input_ids[pos], 1.0, KERNEL_VOCAB_CHUNK, softcap, scale,
            ("entropy", "mean_logits", "is_top1"))
    out["logps"] = zeros.index_add(0, seq, lp.float())
    out["entropy"] = zeros.index_add(0, seq, ent.detach().float())
    out["mean_logits"] = zeros.index_add(0, seq, mean_logit.float())
    out["top1"] = zeros.index_add(0, seq, top1.float())
    return out


# ---------------------------------------------------------------- the model's packed path

def _base_model(model: Any) -> Any:
    """The Hugging Face model under DDP / DeepSpeed / accelerate wrappers and a PEFT wrapper."""
    seen = 0
    while hasattr(model, "module") and seen < 8:  # DDP, DeepSpeedEngine
        model, seen = model.module, seen + 1
    if hasattr(model, "get_base_model"):  # PeftModel: LoRA layers are injected in place
        model = model.get_base_model()
    return model


def enable_packed_forward(model: Any) -> Any:
    """Add the packed path (see the module docstring) to ``model``'s forward; idempotent. Returns the base model.

    Call the *outer* object (the DDP/DeepSpeed/PEFT wrapper) with ``cu_seq_lens=`` so hooks run:
    ``model(input_ids=, position_ids=, cu_seq_lens=[, completion_mask=][, output_router_logits=True])``
    returns a dict with ``logps``/``entropy``/``mean_logits``/``top1``/``tokens`` (causal LM, when
    ``completion_mask`` is given) or ``scores`` (sequence classifier), one value per sequence.
    """
    base = _base_model(model)
    if getattr(base, "_posttrain_packed", False):
        return base
    original = base.forward

    def forward(self: Any, *args: Any, cu_seq_lens: Any = None, completion_mask: Any = None, **kw: Any) -> Any:
        if cu_seq_lens is None:
            return original(*args, **kw)
        ids = kw["input_ids"] if kw.get("input_ids") is not None else args[0]
        return _packed_call(self, ids, kw["position_ids"], cu_seq_lens, completion_mask,
                            bool(kw.get("output_router_logits")))

    base.forward = types.MethodType(forward, base)
    base._posttrain_packed = True
    return base


def _packed_call(base: Any, input_ids: Any, position_ids: Any, cu_seq_lens: Any, completion_mask: Any,
                 router: bool) -> dict[str, Any]:
    import torch

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError("packed forward: input_ids must be one row of shape [1, T]")
    trunk = getattr(base, base.base_model_prefix)
    cu = cu_seq_lens.to(device=input_ids.device, dtype=torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    kw: dict[str, Any] = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    if router:
        kw["output_router_logits"] = True
    out = trunk(input_ids=input_ids, position_ids=position_ids, attention_mask=None, use_cache=False, **kw)
    hidden = out.last_hidden_state[0]
    if completion_mask is None:
        head = getattr(base, "score", None)
        if head is None:
            raise ValueError(f"packed forward: {type(base).__name__} has no score head; pass completion_mask for "
                             "log-probs")
        return {"scores": head(hidden[last_token_index(cu)]).squeeze(-1)}
    res = packed_logprobs(hidden, base.get_output_embeddings(), input_ids[0], completion_mask[0], cu, base.config)
    if router:
        res["aux_loss"] = _router_loss(base.config, out.router_logits)
    return res


def _router_loss(config: Any, router_logits: Any) -> Any:
    """The MoE load-balancing loss over every token of the row (all real: nothing to mask)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    text = config.get_text_config()
    return load_balancing_loss_func(router_logits, text.num_experts, text.num_experts_per_tok, None)

