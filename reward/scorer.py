"""Batched reward scoring: (prompt messages, assistant response) -> one float, higher = better.

Input: a sequence-classification reward model folder (``num_labels=1``; what
stage ``reward`` writes, or the tiny model's ``reward/``) and its tokenizer.
Output: one float per conversation. Used by synthesis stages, ``eval``, online
DPO and the reward stage's own held-out evaluation, so every caller scores a
conversation exactly the way the reward model was trained to read it: the
tokenizer's chat template over ``prompt + [assistant response]``, the score
taken at the last real token that is not the model's pad id (where the model itself pools).

Padding: batches are padded on the tokenizer's side (the tiny tokenizer pads
left), but the score is read at the last position whose attention mask is 1
and position ids count real tokens only, so a conversation scores the same
alone or in any batch, whichever side is padded. Conversations longer than
``max_length`` keep their last ``max_length`` tokens (the score is read at the
end) and are counted in ``truncated``. Works on CPU and CUDA (``device="auto"``).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("posttrain")

Messages = list[dict]


class RewardScorer:
    """A loaded reward model that scores conversations in batches."""

    def __init__(self, model_path: str, tokenizer_path: str | None = None, *, device: str = "auto",
                 dtype: str = "auto", batch_size: int = 16, max_length: int = 2048):
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        from posttrain.core.sampling.hf import resolve_device, torch_dtype

        cfg = AutoConfig.from_pretrained(model_path)
        archs = getattr(cfg, "architectures", None) or []
        if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
            raise ValueError(f"{model_path}: not a reward model (architectures {archs}); train one with stage "
                             "'reward' or point at a sequence-classification folder")
        if getattr(cfg, "num_labels", 1) != 1:
            raise ValueError(f"{model_path}: a reward model has num_labels=1, this one has {cfg.num_labels}")
        dev = resolve_device(device)
        from posttrain.core.distributed import plain_loading

        with plain_loading():  # a scorer is never a ZeRO-3 engine: load it whole, on this rank alone
            model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=torch_dtype(dtype, dev))
        model.to(dev)
        tok = AutoTokenizer.from_pretrained(tokenizer_path or model_path)
        self._init(model, tok, batch_size=batch_size, max_length=max_length)
        self.model_path = model_path

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, *, batch_size: int = 16, max_length: int = 2048) -> "RewardScorer":
        """Wrap an in-memory sequence-classification model (training-time evaluation, online DPO)."""
        self = cls.__new__(cls)
        self._init(model, tokenizer, batch_size=batch_size, max_length=max_length)
        self.model_path = None
        return self

    def _init(self, model: Any, tokenizer: Any, *, batch_size: int, max_length: int) -> None:
        if batch_size < 1 or max_length < 2:
            raise ValueError("batch_size must be >= 1 and max_length >= 2")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: the tokenizer has no chat template")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = next(model.parameters()).device
        self.truncated = 0  # conversations cut to max_length so far
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError(f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: the tokenizer has neither a pad "
                             "nor an eos token")
        model.eval()

    # ---------------------------------------------------------------- public API

    def score(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        """prompt messages + one assistant response each -> one float each (higher = better)."""
        if len(prompts) != len(responses):
            raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        return self.score_messages([list(p) + [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses)])

    def score_messages(self, conversations: list[Messages]) -> list[float]:
        """Score whole conversations (each ending with the assistant turn to judge)."""
        return self.score_ids([self.encode(c) for c in conversations])

    def encode(self, conversation: Messages) -> list[int]:
        """Token ids of a conversation, exactly as stage ``reward`` tokenizes training pairs."""
        enc = self.tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)
        return list(enc["input_ids"])

    def score_ids(self, sequences: list[list[int]]) -> list[float]:
        """Score pre-tokenized sequences, batched by length; results in input order."""
        import torch

        if not sequences:
            return []
        seqs = []
        for s in sequences:
            if len(s) == 0:
                raise ValueError("score: an empty token sequence cannot be scored")
            if len(s) > self.max_length:
                if not self.truncated:
                    log.warning("reward scorer: conversations over max_length=%d tokens keep their last %d tokens",
                                self.max_length, self.max_length)
                self.truncated += 1
                s = s[-self.max_length:]  # the score is read at the end: keep the end
            seqs.append(s)
        # Similar lengths share a batch so little compute goes to padding.
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = [0.0] * len(seqs)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                vals = self._forward([seqs[i] for i in idx])
                for i, v in zip(idx, vals):
                    out[i] = v
        return out

    def close(self) -> None:
        """Release the model (and GPU memory)."""
        import gc

        self.model = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a hard dependency
            pass

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- internals

    def _forward(self, batch: list[list[int]]) -> list[float]:
        """Pad one batch, run the trunk, read the score head at each row's last real token."""
        import torch

        if self.model is None:
            raise RuntimeError("RewardScorer is closed")
        ids, mask = pad_batch(batch, self.pad_id, getattr(self.tokenizer, "padding_side", "right"))
        ids, mask = ids.to(self.device), mask.to(self.device)
        # Positions count real tokens only, so left padding does not shift RoPE positions.
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        # Read the score where the model read it in training: HF's sequence-classification models pool at
        # the last token that is not the config's pad id, so a conversation that ends in that id (pad ==
        # eos, and a template ending in eos) was scored before it; the mask alone would read one later.
        model_pad = getattr(getattr(self.model, "config", None), "pad_token_id", None)
        last = last_token_index(mask if model_pad is None else mask * (ids != model_pad))
        rows = torch.arange(ids.size(0), device=self.device)
        head = getattr(self.model, "score", None)
        trunk = getattr(self.model, getattr(self.model, "base_model_prefix", ""), None)
        if head is not None and trunk is not None and trunk is not self.model:
            hidden = trunk(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
            scores = head(hidden[rows, last]).squeeze(-1)
        else:
            # Unknown layout (e.g. a PEFT wrapper): the model pools itself; with our own mask-based index
            # when it returns per-token logits.
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
            scores = logits[rows, last, 0] if logits.dim() == 3 else logits[:, 0]
        return [float(x) for x in scores.float().cpu()]


def pad_batch(batch: list[list[int]], pad_id: int, side: str = "right") -> tuple[Any, Any]:
    """(input_ids, attention_mask) tensors for token lists padded to the longest on ``side``."""
    import torch

    width = max(len(s) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, s in enumerate(batch):
        if side == "left":
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
        else:
            ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, :len(s)] = 1
    return ids, mask


def last_token_index(mask: Any) -> Any:
    """Index of the last position with mask 1 in each row (works for left and right padding)."""
    import torch

    pos = torch.arange(mask.size(-1), device=mask.device).expand_as(mask)
    return (pos * mask).argmax(-1)
