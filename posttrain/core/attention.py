"""Attention back-ends for training: flash-attention varlen on GPUs, per-document sdpa on CPUs.

Input: the stage's ``attn_implementation`` key and the recipe's ``model.attn_implementation``.
Output: the name to pass to ``from_pretrained`` (``pick_attention``); on CPU with packed
(padding-free) rows that is ``sdpa_varlen``, registered here with transformers' attention
interface: causal sdpa run once per packed document, the CPU stand-in for flash-attention varlen.
"""

from __future__ import annotations

import logging
from typing import Any

from posttrain.core.distributed import on_gpu

log = logging.getLogger("posttrain")


CPU_VARLEN = "sdpa_varlen"


def register_sdpa_varlen() -> str:
    """Register ``sdpa_varlen``: sdpa run once per packed document (the CPU stand-in for flash varlen).

    A padding-free batch is one flat row holding many documents. Plain sdpa attends over the
    whole row under a block-diagonal mask, which costs (sum of lengths)^2 and builds that mask;
    this calls causal sdpa on each document (boundaries from the collator's ``cu_seq_lens_q``, or
    where ``position_ids`` restart at 0), costing sum(length^2) and no mask, like flash-attention
    varlen on GPUs. Padded batches (a 2-D attention mask) use ordinary sdpa with its mask.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if CPU_VARLEN in AttentionInterface._global_mapping:
        return CPU_VARLEN

    def varlen_mask(*args: Any, attention_mask: Any = None, **kw: Any) -> Any:
        # No padding mask: the attention function derives document boundaries itself.
        return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kw)

    def sdpa_varlen(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):  # noqa: ANN001
        import torch

        if attention_mask is not None or query.shape[2] != key.shape[2]:  # padded batch or KV cache
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kw)
        gqa = query.shape[1] != key.shape[1]
        drop = dropout if module.training else 0.0
        rows = []
        for r in range(query.shape[0]):
            if kw.get("cu_seq_lens_q") is not None and query.shape[0] == 1:
                bounds = kw["cu_seq_lens_q"].tolist()
            elif kw.get("position_ids") is not None:
                pos = kw["position_ids"]
                starts = (pos[r if pos.shape[0] > 1 else 0] == 0).nonzero().flatten().tolist()
                bounds = ([0] if not starts or starts[0] != 0 else []) + starts + [query.shape[2]]
            else:
                bounds = [0, query.shape[2]]
            # split (not slicing): its backward is one concatenation, where per-slice backward would
            # write a full-size zero gradient for every document
            lens = [b - a for a, b in zip(bounds, bounds[1:]) if b > a]
            qs, ks, vs = (t[r:r + 1].split(lens, dim=2) for t in (query, key, value))
            rows.append(torch.cat([torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=drop, scale=scaling, enable_gqa=gqa)
                for q, k, v in zip(qs, ks, vs)], dim=2))
        return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None

    AttentionInterface.register(CPU_VARLEN, sdpa_varlen)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CPU_VARLEN, varlen_mask)
    return CPU_VARLEN


def pick_attention(stage_value: str | None, recipe_value: str, packed: bool = False) -> str:
    """flash-attention varlen on GPU when installed; on CPU sdpa, per document (``sdpa_varlen``) when packed."""
    want = stage_value or recipe_value
    if on_gpu():
        if stage_value is None:
            try:
                import flash_attn  # noqa: F401

                return "flash_attention_2"
            except ImportError:
                return want
        return want
    if want.startswith("flash"):
        log.warning("flash-attention needs a GPU: using sdpa on CPU")
        want = "sdpa"
    if packed and want == "sdpa" and stage_value is None:
        return register_sdpa_varlen()
    if want == CPU_VARLEN:
        return register_sdpa_varlen()
    return want
