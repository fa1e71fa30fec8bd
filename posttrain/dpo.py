"""Stage ``dpo``: offline Direct Preference Optimization on preference records.

Input: preference records (``{"prompt", "chosen", "rejected"}``, TRL's
conversational format; JSONL, Parquet, a ``datasets`` folder or ``@stage``)
and the starting policy (the stage's ``model`` key or the recipe's
``model.path``, usually ``@sft``).

Output, in the stage folder: the trained policy + tokenizer (HF format, usable
as ``@dpo``; with LoRA and ``lora.merge`` the merged model, adapter in
``adapter/``), ``loss_log.jsonl`` (step, loss, lr, rewards/margins,
rewards/accuracies per logged step), ``data_stats.json`` (rows read, skipped
because chosen == rejected, held out), ``eval.json`` (held-out preference
accuracy and mean reward margin before and after training, when an eval split
exists) and ``checkpoints/``.

How: TRL's ``DPOTrainer``. ``loss_type`` defaults to ``sigmoid`` (the DPO
paper); any TRL loss type (ipo, hinge, robust, ...) or a list of them with
``loss_weights`` is passed through. The reference is the starting policy: a
frozen copy for full fine-tuning, the same weights with the adapter disabled
under LoRA, or, with ``precompute_ref_log_probs``, log-probs computed once
before training so no reference model is held during training. The learning
rate follows the same peak->floor schedule as ``sft`` (``train.*``), and
``merging:`` wraps the optimizer in the online merging optimizer
(``posttrain.merging``, OnDARE / OnTIES) to reduce the alignment tax.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from posttrain.merging import MergingConfig
from posttrain.recipe import input_field
from posttrain.records import iter_records
from posttrain.sft import (BadInput, LoraSection, ScheduleMixin, TrainArgs, barrier, dataset_on_disk,
                           distributed_info, is_main_process, last_checkpoint, load_causal_lm, load_tokenizer,
                           lora_config, loss_log_callback, pick_attention, save_final, setup_distributed, trl_args)

log = logging.getLogger("posttrain")


@dataclass
class DPOTrainArgs(TrainArgs):
    """Trainer settings for DPO (``stages[i].train.*``); defaults differ from SFT's."""

    learning_rate: float = 5e-7  # peak rate (Online Merging Optimizer paper: DPO lr 5e-7..1e-6)
    min_learning_rate: float = 5e-8  # floor on the last step
    num_train_epochs: float = 1.0  # one pass over the pairs
    weight_decay: float = 0.0  # no decay: the KL to the reference already regularises


@dataclass
class DPOStageConfig:
    """Stage ``dpo``: offline DPO on preference pairs (sigmoid loss by default)."""

    input: str = input_field()  # preference records (file or @stage)
    eval_input: str | None = input_field(None)  # held-out preference records
    eval_fraction: float = 0.0  # without eval_input: hold out this fraction of input (seeded) for evaluation
    model: str | None = None  # starting policy (default: recipe model.path)
    ref_model: str | None = None  # reference model (default: the starting policy)
    beta: float = 0.1  # KL strength (DPO's beta)
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])  # TRL loss types: sigmoid, ipo, hinge, robust, ...
    loss_weights: list[float] | None = None  # weights when several loss types are combined
    label_smoothing: float = 0.0  # conservative / robust DPO smoothing
    precompute_ref_log_probs: bool = False  # compute reference log-probs once; no reference model during training
    max_length: int | None = 2048  # prompt + completion tokens per side (null: no truncation)
    truncation_mode: Literal["keep_start", "keep_end"] = "keep_start"  # which end of an over-long pair is kept
    attn_implementation: str | None = None  # null: flash_attention_2 on GPU when installed, else model.attn_implementation
    limit: int | None = None  # use only the first N records
    resume: bool = True  # continue from the newest checkpoint in checkpoints/
    lora: LoraSection | None = None  # LoRA instead of full fine-tuning (reference = adapter disabled)
    merging: MergingConfig | None = None  # online merging optimizer (OnDARE/OnTIES); needs full fine-tuning
    train: DPOTrainArgs = field(default_factory=DPOTrainArgs)  # optimizer / schedule / Trainer settings

    def check(self) -> None:
        """Cross-field rules."""
        if not 0 <= self.eval_fraction < 1:
            raise ValueError("eval_fraction must be in [0, 1)")
        if self.beta <= 0:
            raise ValueError("beta must be > 0")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError("loss_weights needs one weight per loss_type")
        if self.merging is not None and self.lora is not None:
            raise ValueError("merging needs full fine-tuning (set lora: null or merging: null)")


def pair_rows(records: list[dict], source: str) -> tuple[list[dict], dict]:
    """TRL rows ``{prompt, chosen, rejected}``; pairs whose chosen equals rejected are skipped and counted."""
    if not records:
        raise BadInput(f"{source}: no preference records")
    rows, same = [], 0
    for r in records:
        if r["chosen"] == r["rejected"]:
            same += 1
            continue
        rows.append({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]})
    if not rows:
        raise BadInput(f"{source}: all {len(records)} pairs have chosen == rejected; nothing to learn")
    if same:
        log.warning("dpo %s: skipped %d pairs whose chosen equals rejected", source, same)
    return rows, {"records": len(records), "skipped_chosen_equals_rejected": same, "rows": len(rows)}


def _dpo_trainer_class() -> type:
    from trl import DPOTrainer

    class PosttrainDPOTrainer(ScheduleMixin, DPOTrainer):
        pass

    return PosttrainDPOTrainer


def build_dpo_trainer(cfg: DPOStageConfig, model_path: str, tokenizer: Any, train_rows: list[dict],
                      eval_rows: list[dict] | None, out_dir: Any, seed: int, dtype: str = "auto",
                      attn: str = "sdpa", ref_path: str | None = None, callbacks: list | None = None) -> Any:
    """The configured DPOTrainer (also used by tests and the benchmark)."""
    from trl import DPOConfig

    if not getattr(tokenizer, "chat_template", None):
        raise BadInput(f"{model_path}: the tokenizer has no chat template (set tokenizer.chat_template in the recipe)")
    setup_distributed(cfg.train.deepspeed)
    args = trl_args(DPOConfig, cfg.train, out_dir, seed, beta=cfg.beta, loss_type=list(cfg.loss_type),
                    loss_weights=cfg.loss_weights, label_smoothing=cfg.label_smoothing,
                    precompute_ref_log_probs=cfg.precompute_ref_log_probs, max_length=cfg.max_length,
                    truncation_mode=cfg.truncation_mode, eval_strategy="no", padding_free=False)
    model = load_causal_lm(model_path, dtype, attn)
    model.config.use_cache = False
    ref = None
    if ref_path and cfg.lora is None:
        ref = load_causal_lm(ref_path, dtype, attn)
    data = out_dir / "_data"
    train_ds = dataset_on_disk(train_rows, data)
    eval_ds = dataset_on_disk(eval_rows, data) if eval_rows else None
    cls = _dpo_trainer_class()
    trainer = cls(model=model, ref_model=ref, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                  processing_class=tokenizer, peft_config=lora_config(cfg.lora) if cfg.lora else None,
                  callbacks=callbacks or [])
    trainer.schedule = cfg.train
    return trainer


def _eval_summary(m: dict) -> dict:
    keys = {"eval_rewards/accuracies": "accuracy", "eval_rewards/margins": "margin", "eval_loss": "loss",
            "eval_rewards/chosen": "reward_chosen", "eval_rewards/rejected": "reward_rejected"}
    return {v: m[k] for k, v in keys.items() if k in m}


def run(cfg: DPOStageConfig, ctx: Any) -> dict:
    """Entry point of stage kind ``dpo``."""
    if cfg.train.deepspeed:  # a copy: the recipe's own config (and its fingerprint) stays as written
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, deepspeed=ctx.resolve(cfg.train.deepspeed)))
    model_path = ctx.model_path(cfg.model)
    tok = load_tokenizer(ctx, model_path)
    src = ctx.resolve(cfg.input)
    records = list(iter_records(src, "preference"))
    if cfg.limit is not None:
        records = records[: cfg.limit]
    rows, stats = pair_rows(records, src)
    eval_rows = None
    if cfg.eval_input:
        esrc = ctx.resolve(cfg.eval_input)
        eval_rows, stats["eval"] = pair_rows(list(iter_records(esrc, "preference")), esrc)
    elif cfg.eval_fraction > 0:
        random.Random(ctx.seed).shuffle(rows)
        k = max(1, int(len(rows) * cfg.eval_fraction))
        if k >= len(rows):
            raise BadInput(f"{src}: eval_fraction {cfg.eval_fraction} leaves no training pairs")
        eval_rows, rows = rows[:k], rows[k:]
        stats["held_out"] = k
    if is_main_process():
        ctx.write_json("data_stats.json", stats)
    resume = last_checkpoint(ctx.out_dir) if cfg.resume else None
    resume_step = int(resume.rsplit("-", 1)[1]) if resume else 0
    seed = cfg.train.seed if cfg.train.seed is not None else ctx.seed
    attn = pick_attention(cfg.attn_implementation, ctx.recipe.file.model.attn_implementation)
    ref_path = ctx.resolve(cfg.ref_model) if cfg.ref_model else None
    trainer = build_dpo_trainer(cfg, model_path, tok, rows, eval_rows, ctx.out_dir, seed,
                                ctx.recipe.file.model.dtype, attn, ref_path,
                                callbacks=[loss_log_callback(ctx.out_dir / "loss_log.jsonl", resume_step)])
    if cfg.merging is not None:
        from posttrain import merging

        reference, base = merging.resolve_paths(cfg.merging, ctx, ref_path or model_path)
        merging.patch_trainer(trainer, cfg.merging, reference=reference, base=base)
    evals: dict[str, Any] = {}
    if eval_rows and not resume:
        evals["before"] = _eval_summary(trainer.evaluate())
    result = trainer.train(resume_from_checkpoint=resume)
    if eval_rows:
        evals["after"] = _eval_summary(trainer.evaluate())
        if is_main_process():
            ctx.write_json("eval.json", evals)
    saved = save_final(trainer, ctx.out_dir, tok, cfg.lora, model_path, ctx.recipe.file.model.dtype)
    if is_main_process():
        if not cfg.train.keep_checkpoints:
            shutil.rmtree(ctx.out_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(ctx.out_dir / "_data", ignore_errors=True)
    barrier()
    return {"model": str(ctx.out_dir), "saved": saved, "steps": trainer.state.global_step, "resumed_from": resume,
            "data": stats, "metrics": dict(result.metrics),
            "distributed": distributed_info(trainer), "eval": evals, "loss_type": cfg.loss_type,
            "beta": cfg.beta, "reference": "precomputed" if cfg.precompute_ref_log_probs else
            ("disabled-adapter" if cfg.lora else (ref_path or "frozen copy of the starting policy")),
            "merging": json.loads(json.dumps(asdict(cfg.merging))) if cfg.merging else None}
