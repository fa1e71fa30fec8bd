"""Stage ``sft``: supervised fine-tuning on demonstrations with the Qwen2 recipe.

Input: demonstration records (``{"messages": [...]}``; JSONL, Parquet, a
``datasets`` folder, or an ``@stage`` reference) and a causal LM (the stage's
``model`` key or the recipe's ``model.path``).

Output, in the stage folder (so later stages can name ``@sft`` as a model):

* the fine-tuned model + tokenizer (HF format; with LoRA and ``lora.merge``
  the merged model, with the adapter kept in ``adapter/``),
* ``loss_log.jsonl``: one line per logged step ``{step, epoch, loss, lr,
  grad_norm, num_tokens}`` (``lr`` is the rate the optimizer step used),
* ``data_stats.json``: rows read / skipped / truncated / dropped and the
  trained-token counts, ``checkpoints/`` (HF Trainer checkpoints, used to resume).

How: rows are tokenized here with the chat template's ``{% generation %}``
markers so only assistant tokens, including each turn's end-of-turn token, are
trained (``posttrain.core.chat.training_template`` picks the training variant of a
known template). Over-long rows are truncated or dropped (``overlong``)
and counted. TRL's ``SFTTrainer`` then packs rows best-fit-decreasing into
``max_length`` token bins and feeds them padding-free (one flat sequence,
``position_ids`` restarting per document, so documents never attend to each
other: sdpa on CPU, flash-attention varlen on GPU) and computes the loss through
its chunked LM head, which never materialises the full ``tokens x vocab``
logits. ``loss: naive`` swaps in a plain full-logits cross-entropy (for the
memory benchmark).

Learning-rate schedule (the Qwen2 preset): the report says the rate "gradually
decreased from 7e-6 to 7e-7" over 2 epochs and names no shape. We default to
*linear* decay from the peak at the first optimizer step to the floor at the
last one: the report gives exactly two endpoints, linear interpolation is the
reading that adds no unstated parameter, and it spends as many steps near the
floor as near the peak (cosine-with-floor, ``lr_schedule: cosine``, keeps the
rate near the peak longer; both hit 7e-6 on the first step and 7e-7 on the last).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from posttrain.core.attention import pick_attention
from posttrain.core.chat import tokenize_conversation, training_template
from posttrain.core.config import key
from posttrain.core.inputs import DataSection, InputSpec
from posttrain.core.inputs import input_label as _label
from posttrain.core.distributed import is_main_process
from posttrain.core.errors import BadInput
from posttrain.core.trainkit import (LoraSection, ScheduleMixin, TrainArgs, begin, dataset_on_disk, finish,
                                     load_causal_lm, lora_config, trl_args)

log = logging.getLogger("posttrain")


# ---------------------------------------------------------------- config

@dataclass
class SFTStageConfig:
    """Stage ``sft``: supervised fine-tuning on demonstrations (assistant-only loss, packed, padding-free)."""

    input: InputSpec = key(doc="demonstration records (file or @stage)", input="demonstration")
    data: DataSection = key(factory=DataSection, doc="checks on the input rows: line size, share of unusable rows")
    eval_input: InputSpec | None = key(None, "held-out demonstrations: eval loss logged at the end", input="demonstration")
    model: str | None = key(None, "model to fine-tune (default: recipe model.path)", model=True)
    max_length: int = key(4096, "tokens per packed row (Qwen2 report: 32768)")
    overlong: Literal["truncate", "drop"] = key("drop", "rows longer than max_length: cut at max_length, or skip")
    packing: bool = key(True, "best-fit-decreasing packing into max_length bins, padding-free")
    assistant_only_loss: bool = key(True, "train only assistant tokens (+ their end-of-turn token)")
    loss: Literal["chunked", "naive"] = key("chunked", "chunked LM-head loss (no full logits) or full logits")
    attn_implementation: str | None = key(None, "null: flash_attention_2 on GPU when installed, else model.attn_implementation")
    limit: int | None = key(None, "use only the first N records")
    resume: bool = key(True, "continue from the newest checkpoint in checkpoints/ when present")
    lora: LoraSection | None = key(None, "LoRA instead of full fine-tuning")
    train: TrainArgs = key(factory=TrainArgs, doc="optimizer / schedule / Trainer settings")

    def check(self) -> None:
        """Cross-field rules."""
        if self.max_length < 16:
            raise ValueError("max_length must be >= 16")


# ---------------------------------------------------------------- data

def tokenize_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a language-modelling ``text`` row: no chat template, the tokenizer's own special
    tokens, and the end-of-sequence token appended (as TRL does), so the model learns to stop."""
    ids = list(tokenizer(text)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def prepare_rows(records: list[dict], tokenizer: Any, template: str | None, max_length: int,
                 overlong: str, assistant_only: bool, source: str) -> tuple[list[dict], dict]:
    """Tokenize demonstrations; skip rows without an assistant turn, truncate/drop over-long rows.

    Conversations go through the chat template (``template``; assistant tokens only when
    ``assistant_only``); ``text`` rows are raw text trained on every token. Returns (rows
    ``{"input_ids", "labels"}``, counts). Raises BadInput when nothing is trainable.
    """
    st = {"records": len(records), "skipped_no_assistant": 0, "truncated": 0, "dropped_overlong": 0,
          "dropped_no_trainable": 0, "text_rows": 0}
    rows = []
    for rec in records:
        if "messages" not in rec and isinstance(rec.get("text"), str):
            ids = tokenize_text(tokenizer, rec["text"])
            labels = list(ids)
            st["text_rows"] += 1
        else:
            msgs = rec["messages"]
            if not any(m["role"] == "assistant" for m in msgs):
                st["skipped_no_assistant"] += 1
                continue
            ids, labels = tokenize_conversation(tokenizer, msgs, template, assistant_only)
        if len(ids) > max_length:
            if overlong == "drop":
                st["dropped_overlong"] += 1
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            st["truncated"] += 1
        if all(x == -100 for x in labels[1:]):  # nothing left to predict (e.g. prompt filled max_length)
            st["dropped_no_trainable"] += 1
            continue
        rows.append({"input_ids": ids, "labels": labels})
    if not records:
        raise BadInput(f"{source}: no demonstration records")
    if not rows:
        raise BadInput(f"{source}: none of {len(records)} rows is trainable ({json.dumps(st)})")
    st["rows"] = len(rows)
    st["tokens"] = sum(len(r["input_ids"]) for r in rows)
    st["trained_tokens"] = sum(sum(x != -100 for x in r["labels"][1:]) for r in rows)
    return rows, st


# ---------------------------------------------------------------- the trainer

def _sft_trainer_class() -> type:
    """SFTTrainer + our schedule, and the optional full-logits loss (``loss: naive``) for benchmarks."""
    from trl import SFTTrainer

    from posttrain.core.losses import full_logits_lm_loss

    class PosttrainSFTTrainer(ScheduleMixin, SFTTrainer):
        naive_loss = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
            if not self.naive_loss:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            scale = self.accelerator.num_processes if (self.args.average_tokens_across_devices
                                                       and num_items_in_batch is not None) else 1.0
            return full_logits_lm_loss(model, inputs, num_items_in_batch, scale)

    return PosttrainSFTTrainer


def build_sft_trainer(cfg: SFTStageConfig, model_path: str, tokenizer: Any, train_rows: list[dict],
                      eval_rows: list[dict] | None, out_dir: Path, seed: int, dtype: str = "auto",
                      attn: str | None = None, callbacks: list | None = None, run_name: str | None = None) -> Any:
    """The configured trainer (also used by tests and the benchmark); ``attn`` null: ``pick_attention``."""
    from trl import SFTConfig

    from posttrain.core.distributed import setup_distributed

    attn = attn or pick_attention(cfg.attn_implementation, "sdpa", packed=cfg.packing)
    setup_distributed(cfg.train.deepspeed)
    args = trl_args(SFTConfig, cfg.train, out_dir, seed, run_name=run_name, max_length=cfg.max_length,
                    packing=cfg.packing, packing_strategy="bfd", padding_free=cfg.packing, dataset_num_proc=None,
                    eval_strategy="no", shuffle_dataset=False)
    model = load_causal_lm(model_path, dtype, attn)  # after the args: ZeRO-3 partitions during loading
    model.config.use_cache = False
    data = out_dir / "_data"
    train_ds = dataset_on_disk(train_rows, data)
    eval_ds = dataset_on_disk(eval_rows, data) if eval_rows else None
    cls = _sft_trainer_class()
    trainer = cls(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                  peft_config=lora_config(cfg.lora) if cfg.lora else None, callbacks=callbacks or [])
    trainer.schedule = cfg.train
    trainer.naive_loss = cfg.loss == "naive"
    return trainer


def run(cfg: SFTStageConfig, ctx: Any) -> dict:
    """Entry point of stage kind ``sft``."""
    tr = begin(cfg, ctx, packed=cfg.packing)
    cfg, tok = tr.cfg, tr.tokenizer
    src = _label(cfg.input)
    template = training_template(tok, ctx.tokenizer_path(tr.model_path)) if cfg.assistant_only_loss else None
    records = ctx.read_input(cfg.input, "demonstration", cfg.limit)
    rows, stats = prepare_rows(records, tok, template, cfg.max_length, cfg.overlong, cfg.assistant_only_loss, src)
    stats["input"] = ctx.input_stats
    eval_rows = None
    if cfg.eval_input:
        eval_rows, estats = prepare_rows(ctx.read_input(cfg.eval_input, "demonstration"), tok, template,
                                         cfg.max_length, cfg.overlong, cfg.assistant_only_loss, _label(cfg.eval_input))
        stats["eval"] = estats
    for k in ("skipped_no_assistant", "truncated", "dropped_overlong", "dropped_no_trainable"):
        if stats[k]:
            log.warning("sft %s: %d rows %s", src, stats[k], k.replace("_", " "))
    if is_main_process():
        ctx.write_json("data_stats.json", stats)
    trainer = build_sft_trainer(cfg, tr.model_path, tok, rows, eval_rows, ctx.out_dir, tr.seed, tr.dtype, tr.attn,
                                callbacks=tr.callbacks, run_name=ctx.run_name)
    result = trainer.train(resume_from_checkpoint=tr.resume)
    evaluated = trainer.evaluate() if eval_rows else {}  # before finish(): it removes the datasets
    summary = finish(tr, trainer, result)
    summary["metrics"].update(evaluated)
    return {**summary, "data": stats}
