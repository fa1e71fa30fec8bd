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
``loss_weights`` is passed through. ``packing: true`` feeds each micro-batch
padding-free (``posttrain.trainers.dpo_packed``: one row, per-document
attention, log-probs at completion tokens only; sigmoid loss only), where TRL
pads every pair to the batch's longest sequence. The reference is the starting policy: a
frozen copy for full fine-tuning, the same weights with the adapter disabled
under LoRA, or, with ``precompute_ref_log_probs``, log-probs computed once
before training so no reference model is held during training. The learning
rate follows the same peak->floor schedule as ``sft`` (``train.*``), and
``merging:`` wraps the optimizer in the online merging optimizer
(``posttrain.core.merging``, OnDARE / OnTIES) to reduce the alignment tax.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass
from typing import Any, Literal

from posttrain.core.config import key
from posttrain.core.inputs import PreferenceInputs
from posttrain.core.inputs import input_label as _label
from posttrain.core.distributed import is_main_process, setup_distributed
from posttrain.core.errors import BadInput
from posttrain.core.merging import MergingConfig
from posttrain.core.trainkit import (LoraSection, ScheduleMixin, TrainArgs, begin, dataset_on_disk, finish,
                                     load_causal_lm, lora_config, trl_args)

log = logging.getLogger("posttrain")


# The loss types TRL 1.16's DPOTrainer implements, and those of them that read label_smoothing.
TRL_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
SMOOTHED_LOSS_TYPES = ("robust", "exo_pair", "aot", "aot_unpaired")


@dataclass
class DPOTrainArgs(TrainArgs):
    """Trainer settings for DPO (``stages[i].train.*``); defaults differ from SFT's."""

    learning_rate: float = key(5e-7, "peak rate (Online Merging Optimizer paper: DPO lr 5e-7..1e-6)")
    min_learning_rate: float = key(5e-8, "floor on the last step")
    num_train_epochs: float = key(1.0, "one pass over the pairs")
    weight_decay: float = key(0.0, "no decay: the KL to the reference already regularises")


@dataclass
class DPOStageConfig(PreferenceInputs):
    """Stage ``dpo``: offline DPO on preference pairs (sigmoid loss by default)."""

    model: str | None = key(None, "starting policy (default: recipe model.path)", model=True)
    ref_model: str | None = key(None, "reference model (default: the starting policy)", model=True)
    beta: float = key(0.1, "KL strength (DPO's beta)")
    loss_type: list[str] = key(factory=lambda: ["sigmoid"], doc="TRL loss types: " + ", ".join(TRL_LOSS_TYPES))
    loss_weights: list[float] | None = key(None, "weights when several loss types are combined")
    label_smoothing: float = key(0.0, "epsilon of the loss types that read it: " + ", ".join(SMOOTHED_LOSS_TYPES)
                                 + " (an error with any other: TRL would ignore it)")
    precompute_ref_log_probs: bool = key(False, "compute reference log-probs once; no reference model during training")
    packing: bool = key(False, "padding-free: each micro-batch's chosen and rejected sequences packed into one row "
                        "(per-document sdpa on CPU, flash-attention varlen on GPU); loss_type must be [sigmoid]")
    max_length: int | None = key(2048, "prompt + completion tokens per side (null: no truncation)")
    truncation_mode: Literal["keep_start", "keep_end"] = key("keep_start", "which end of an over-long pair is kept")
    attn_implementation: str | None = key(None, "null: flash_attention_2 on GPU when installed, else model.attn_implementation")
    limit: int | None = key(None, "use only the first N records")
    resume: bool = key(True, "continue from the newest checkpoint in checkpoints/")
    lora: LoraSection | None = key(None, "LoRA instead of full fine-tuning (reference = adapter disabled)")
    merging: MergingConfig | None = key(None, "online merging optimizer (OnDARE/OnTIES); needs full fine-tuning")
    train: DPOTrainArgs = key(factory=DPOTrainArgs, doc="optimizer / schedule / Trainer settings")

    def check(self, given: frozenset[str] = frozenset()) -> None:
        """Cross-field rules; a key that would have no effect is an error."""
        self.check_inputs()
        if self.beta <= 0:
            raise ValueError("beta must be > 0")
        bad = [t for t in self.loss_type if t not in TRL_LOSS_TYPES]
        if bad or not self.loss_type:
            raise ValueError(f"loss_type: unknown {bad[0] if bad else '(empty)'!r} "
                             f"(TRL knows: {', '.join(TRL_LOSS_TYPES)})")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError("loss_weights needs one weight per loss_type")
        if "loss_weights" in given and len(self.loss_type) == 1 and self.loss_weights not in (None, [1.0]):
            raise ValueError("loss_weights has no effect with a single loss_type (remove it)")
        if self.label_smoothing and not set(self.loss_type) & set(SMOOTHED_LOSS_TYPES):
            raise ValueError(f"label_smoothing has no effect with loss_type {self.loss_type} (TRL reads it only for "
                             f"{', '.join(SMOOTHED_LOSS_TYPES)}); for conservative/robust DPO use loss_type: [robust]")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError("label_smoothing must be in [0, 0.5)")
        if self.ref_model is not None and self.lora is not None:
            raise ValueError("ref_model has no effect with LoRA (the reference is the adapter disabled); remove it")
        if self.packing:
            from posttrain.trainers.dpo_packed import INERT_ARGS, PACKED_LOSS_TYPES

            if [t for t in self.loss_type if t not in PACKED_LOSS_TYPES]:
                raise ValueError(f"loss_type {self.loss_type}: packing: true implements {list(PACKED_LOSS_TYPES)} "
                                 "only (set packing: false for TRL's other losses)")
            inert = sorted(set(self.train.extra) & set(INERT_ARGS))
            if inert:
                raise ValueError(f"train.extra.{inert[0]} has no effect with packing: true (remove it)")

    def check_in_recipe(self, recipe: object) -> None:
        """Checks that need the whole recipe: merging needs a base model."""
        base = getattr(getattr(recipe, "model", None), "base", None)
        if self.merging is not None and not (self.merging.base_model or base):
            raise ValueError("merging needs the pre-trained base model: set merging.base_model or model.base")
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


def _dpo_trainer_class(packed: bool = False) -> type:
    from trl import DPOTrainer

    if packed:
        from posttrain.trainers.dpo_packed import PackedDPOMixin

        class PackedPosttrainDPOTrainer(PackedDPOMixin, ScheduleMixin, DPOTrainer):
            pass

        return PackedPosttrainDPOTrainer

    class PosttrainDPOTrainer(ScheduleMixin, DPOTrainer):
        pass

    return PosttrainDPOTrainer


def build_dpo_trainer(cfg: DPOStageConfig, model_path: str, tokenizer: Any, train_rows: list[dict],
                      eval_rows: list[dict] | None, out_dir: Any, seed: int, dtype: str = "auto",
                      attn: str = "sdpa", ref_path: str | None = None, callbacks: list | None = None,
                      run_name: str | None = None) -> Any:
    """The configured DPOTrainer, padded (TRL's) or packed (``cfg.packing``); also used by tests and the benchmark."""
    from trl import DPOConfig

    if not getattr(tokenizer, "chat_template", None):
        raise BadInput(f"{model_path}: the tokenizer has no chat template (set tokenizer.chat_template in the recipe)")
    setup_distributed(cfg.train.deepspeed)
    args = trl_args(DPOConfig, cfg.train, out_dir, seed, run_name=run_name, beta=cfg.beta,
                    loss_type=list(cfg.loss_type), loss_weights=cfg.loss_weights, label_smoothing=cfg.label_smoothing,
                    precompute_ref_log_probs=cfg.precompute_ref_log_probs, max_length=cfg.max_length,
                    truncation_mode=cfg.truncation_mode, eval_strategy="no", padding_free=False)
    model = load_causal_lm(model_path, dtype, attn)
    model.config.use_cache = False
    ref = None
    if ref_path and cfg.lora is None:
        ref = load_causal_lm(ref_path, dtype, attn, trainable=False)
    data = out_dir / "_data"
    train_ds = dataset_on_disk(train_rows, data)
    eval_ds = dataset_on_disk(eval_rows, data) if eval_rows else None
    cls = _dpo_trainer_class(cfg.packing)
    trainer = cls(model=model, ref_model=ref, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                  processing_class=tokenizer, peft_config=lora_config(cfg.lora) if cfg.lora else None,
                  callbacks=callbacks or [])
    trainer.schedule = cfg.train
    return trainer


def _first_eval(evals: dict[str, Any]) -> Any:
    """A callback that keeps the first evaluation's metrics (the one ``eval_on_start`` runs) as ``evals["before"]``."""
    from transformers import TrainerCallback

    class FirstEval(TrainerCallback):
        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kw: Any) -> None:
            if "before" not in evals and metrics is not None:
                evals["before"] = _eval_summary(dict(metrics))

    return FirstEval()


def _eval_summary(m: dict) -> dict:
    keys = {"eval_rewards/accuracies": "accuracy", "eval_rewards/margins": "margin", "eval_loss": "loss",
            "eval_rewards/chosen": "reward_chosen", "eval_rewards/rejected": "reward_rejected"}
    return {v: m[k] for k, v in keys.items() if k in m}


def run(cfg: DPOStageConfig, ctx: Any) -> dict:
    """Entry point of stage kind ``dpo``."""
    tr = begin(cfg, ctx, packed=cfg.packing)
    cfg = tr.cfg
    src = _label(cfg.input)
    rows, stats = pair_rows(ctx.read_input(cfg.input, "preference", cfg.limit), src)
    stats["input"] = ctx.input_stats
    eval_rows = None
    if cfg.eval_input:
        eval_rows, stats["eval"] = pair_rows(ctx.read_input(cfg.eval_input, "preference"), _label(cfg.eval_input))
    elif cfg.eval_fraction > 0:
        random.Random(ctx.seed).shuffle(rows)
        k = max(1, int(len(rows) * cfg.eval_fraction))
        if k >= len(rows):
            raise BadInput(f"{src}: eval_fraction {cfg.eval_fraction} leaves no training pairs")
        eval_rows, rows = rows[:k], rows[k:]
        stats["held_out"] = k
    if is_main_process():
        ctx.write_json("data_stats.json", stats)
    ref_path = ctx.resolve_model(cfg.ref_model, "ref_model") if cfg.ref_model else None
    trainer = build_dpo_trainer(cfg, tr.model_path, tr.tokenizer, rows, eval_rows, ctx.out_dir, tr.seed, tr.dtype,
                                tr.attn, ref_path, callbacks=tr.callbacks, run_name=ctx.run_name)
    if cfg.merging is not None:
        from posttrain.core import merging

        reference, base = merging.resolve_paths(cfg.merging, ctx, ref_path or tr.model_path)
        merging.patch_trainer(trainer, cfg.merging, reference=reference, base=base)
    evals: dict[str, Any] = {}
    if eval_rows and not tr.resume:
        # The "before" evaluation runs inside train() (eval_on_start), after the model is prepared: an
        # evaluate() call before train() wraps the model in a DeepSpeed inference engine, and train()
        # then never builds the training engine (accelerator.backward finds none and fails).
        trainer.args.eval_on_start = True
        trainer.add_callback(_first_eval(evals))
    result = trainer.train(resume_from_checkpoint=tr.resume)
    if eval_rows:
        evals["after"] = _eval_summary(trainer.evaluate())
        if is_main_process():
            ctx.write_json("eval.json", evals)
    summary = finish(tr, trainer, result)
    return {**summary, "data": stats, "eval": evals, "loss_type": cfg.loss_type, "beta": cfg.beta,
            "packing": cfg.packing, "reference": "precomputed" if cfg.precompute_ref_log_probs else
            ("disabled-adapter" if cfg.lora else (ref_path or "frozen copy of the starting policy")),
            "merging": json.loads(json.dumps(asdict(cfg.merging))) if cfg.merging else None}
