"""The shared trainer kit: one training section, one LoRA section, one schedule, one set-up and wrap-up.

Input: a stage config that has ``train: TrainArgs`` (and usually ``lora``, ``resume``,
``attn_implementation``, ``model``) plus the stage context. Output, for the HF/TRL trainers
(sft, dpo, reward) and the hand-written online DPO loop alike:

* ``TrainArgs`` / ``LoraSection``: the recipe sections, documented key by key;
* ``lr_multiplier`` / ``make_lr_schedule`` / ``ScheduleMixin``: the peak -> floor schedule with
  optional warm-up (the Qwen2 SFT preset is linear 7e-6 -> 7e-7);
* ``trl_args``: a TRL config with CPU-safe defaults (TRL defaults to bf16 and gradient
  checkpointing, 5-15x slower on CPUs);
* ``begin`` (the preamble: resolved DeepSpeed path, model, tokenizer with the recipe's chat
  template, resume checkpoint, seed, attention back-end, loss log) and ``finish`` (the
  epilogue: save, LoRA merge, clean-up, barrier, manifest summary);
* loaders (``load_causal_lm``), ``save_final``, ``dataset_on_disk``, the loss-log callback;
  the trackers (``report_to``: TensorBoard in ``OUT/<stage>/tensorboard``, W&B in
  ``OUT/<stage>/wandb``, never under ``checkpoints/``, which ``keep_checkpoints: false`` deletes)
  come from ``posttrain.core.tracking``: ``begin`` attaches them, ``finish`` ends the W&B run;
* ``use_liger``: whether Liger's Triton kernels patch the model (``use_liger_kernel``; null = on
  with a CUDA GPU and ``liger-kernel`` installed). Liger supplies the layer kernels (RMSNorm, RoPE,
  SwiGLU); its fused linear cross-entropy stays off, because it would replace the model's forward:
  the SFT/DPO loss stays TRL's chunked LM head (``loss: chunked``, no full logits), and a reward
  model's forward stays a sequence classifier's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from posttrain.core.attention import CPU_VARLEN, pick_attention, register_sdpa_varlen
from posttrain.core.config import key
from posttrain.core.devices import dtype_name, torch_dtype
from posttrain.core.distributed import (barrier, deepspeed_requested, distributed_info, is_main_process, on_gpu, plain_loading,
                                        setup_distributed)
from posttrain.core.tracking import check_reporters, finish_wandb, hf_callbacks

log = logging.getLogger("posttrain")

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REPORTERS = ("tensorboard", "wandb")
# TRL config fields that a key of the training section sets: in ``extra`` they would silently override it.
OWNED_TRL_ARGS = ("report_to", "use_liger_kernel")


# ---------------------------------------------------------------- recipe sections

@dataclass
class OptimArgs:
    """Optimizer and schedule settings: the part of ``train:`` every trainer has (online DPO has only this)."""

    learning_rate: float = key(7e-6, "peak rate (Qwen2 report, SFT: 7e-6)")
    min_learning_rate: float = key(7e-7, "floor reached on the last step (Qwen2 report, SFT: 7e-7)")
    lr_schedule: Literal["linear", "cosine", "constant"] = key("linear", "decay shape from peak to floor")
    warmup_steps: int = key(0, "linear warm-up steps before the decay (0: the first step runs at the peak)")
    weight_decay: float = key(0.1, "AdamW weight decay (Qwen2 report, SFT: 0.1)")
    max_grad_norm: float = key(1.0, "gradient clipping (Qwen2 report: 1.0; 0 = off)")
    adam_beta1: float = key(0.9, "AdamW beta1")
    adam_beta2: float = key(0.95, "AdamW beta2 (0.95 is the usual large-LM choice)")
    adam_epsilon: float = key(1e-8, "AdamW epsilon")
    seed: int | None = key(None, "null: the recipe seed + stage index")
    report_to: list[str] = key(factory=lambda: ["tensorboard"],
                               doc="trackers: tensorboard (OUT/<stage>/tensorboard), wandb (OUT/<stage>/wandb; pip "
                                   "install 'qwen2-posttrain[wandb]'; one W&B name per recipe run, the stage as "
                                   "group, the resolved recipe as config); [] for none")

    def check(self, given: frozenset[str] = frozenset()) -> None:
        """Cross-field rules; ``given`` are the keys the recipe set (a key without effect is an error)."""
        if self.learning_rate <= 0 or self.min_learning_rate < 0 or self.min_learning_rate > self.learning_rate:
            raise ValueError("need 0 <= min_learning_rate <= learning_rate and learning_rate > 0")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")
        if self.lr_schedule == "constant" and "min_learning_rate" in given:
            raise ValueError("min_learning_rate has no effect with lr_schedule: constant (remove it)")
        bad = [r for r in self.report_to if r not in REPORTERS]
        if bad:
            raise ValueError(f"report_to: unknown tracker {bad[0]!r} (expected some of: {', '.join(REPORTERS)})")
        check_reporters(self.report_to)  # at recipe load: a missing package fails before any stage trains


@dataclass
class TrainArgs(OptimArgs):
    """Optimizer, schedule and HF Trainer settings (``stages[i].train.*``) of sft, dpo and reward."""

    num_train_epochs: float = key(2.0, "passes over the data (Qwen2 report, SFT: 2 epochs)")
    max_steps: int = key(-1, "> 0 overrides num_train_epochs")
    per_device_train_batch_size: int = key(1, "packed rows (sft) or pairs (dpo, reward) per device per micro-step")
    gradient_accumulation_steps: int = key(1, "micro-steps per optimizer step")
    optim: str = key("adamw_torch", "any transformers `optim` name")
    bf16: bool | None = key(None, "null: on when a CUDA GPU with bf16 is present (CPUs have no bf16 units)")
    gradient_checkpointing: bool | None = key(None, "null: on with a GPU, off on CPU (5-15x slower there)")
    logging_steps: int = key(1, "log (and write loss_log.jsonl) every N optimizer steps")
    save_steps: int | None = key(None, "checkpoint every N steps (null: only the final model)")
    save_total_limit: int | None = key(2, "checkpoints kept in checkpoints/")
    keep_checkpoints: bool = key(True, "false: delete checkpoints/ after the final model is saved")
    deepspeed: str | None = key(None, "DeepSpeed JSON (relative paths: from the recipe's folder); the one source of "
                                "the ZeRO settings (the shipped accelerate configs name none)", input=True)
    dataloader_num_workers: int = key(0, "DataLoader workers")
    use_liger_kernel: bool | None = key(None, "Liger's Triton kernels (RMSNorm, RoPE, SwiGLU; pip install "
                                        "'qwen2-posttrain[gpu]'). null: on when a CUDA GPU is present and "
                                        "liger-kernel is installed; true elsewhere is an error. The LM-head loss "
                                        "stays TRL's chunked one (Liger's fused linear cross-entropy stays off)")
    extra: dict[str, Any] = key(factory=dict, doc="passed verbatim to the TRL config class")

    def check(self, given: frozenset[str] = frozenset()) -> None:
        """Cross-field rules (see ``OptimArgs.check``)."""
        super().check(given)
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("per_device_train_batch_size and gradient_accumulation_steps must be >= 1")
        owned = sorted(set(self.extra) & set(OWNED_TRL_ARGS))
        if owned:
            raise ValueError(f"extra.{owned[0]}: a key of this section sets it (use train.{owned[0]}, not train.extra)")
        if self.use_liger_kernel:
            # Checked at recipe load, so a recipe that cannot have its kernels fails before any stage runs.
            if not on_gpu():
                raise ValueError("use_liger_kernel: true needs a CUDA GPU (Liger's kernels are Triton) and none is "
                                 "visible; use null (on only where a GPU is present) or false")
            if not liger_available():
                raise ValueError("use_liger_kernel: true needs liger-kernel, which is not installed: "
                                 "pip install 'qwen2-posttrain[gpu]' (or use null: on only where it is installed)")
        elif self.use_liger_kernel is False and "liger_kernel_config" in self.extra:
            raise ValueError("extra.liger_kernel_config has no effect with use_liger_kernel: false (remove it)")


@dataclass
class LoraSection:
    """LoRA adapter settings (``stages[i].lora.*``); absent section = full fine-tuning."""

    r: int = key(16, "adapter rank")
    alpha: int = key(32, "scaling numerator (scale = alpha / r)")
    dropout: float = key(0.05, "dropout on the adapter input")
    target_modules: list[str] = key(factory=lambda: list(DEFAULT_LORA_TARGETS), doc="module names to adapt")
    merge: bool = key(True, "merge the adapter into the base and save a full model (else save the adapter only)")


def lora_config(sec: LoraSection, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None) -> Any:
    """A peft LoraConfig from the recipe section (``SEQ_CLS`` + ``modules_to_save=["score"]`` for reward models)."""
    from peft import LoraConfig

    return LoraConfig(r=sec.r, lora_alpha=sec.alpha, lora_dropout=sec.dropout,
                      target_modules=list(sec.target_modules), task_type=task_type, modules_to_save=modules_to_save)


# ---------------------------------------------------------------- schedule

def lr_multiplier(step: int, total: int, warmup: int, floor_ratio: float, shape: str) -> float:
    """Learning-rate factor (times the peak) for optimizer step ``step`` (0-based) of ``total``.

    Warm-up rises linearly to 1 over ``warmup`` steps; then the factor decays from 1 at step
    ``warmup`` to ``floor_ratio`` at step ``total - 1`` (linear or cosine), and stays there.
    """
    if shape == "constant":
        return 1.0 if step >= warmup else (step + 1) / (warmup + 1)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    span = max(1, total - 1 - warmup)
    p = min(1.0, (step - warmup) / span)
    if shape == "cosine":
        return floor_ratio + (1 - floor_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    return 1.0 - (1.0 - floor_ratio) * p


def lr_at(t: OptimArgs, step: int, total: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total`` under section ``t``."""
    return t.learning_rate * lr_multiplier(step, total, t.warmup_steps, t.min_learning_rate / t.learning_rate,
                                           t.lr_schedule)


def set_lr(optimizer: Any, lr: float) -> None:
    """Write ``lr`` into every param group (works through DeepSpeed and the merging wrapper, which share them)."""
    for g in optimizer.param_groups:
        g["lr"] = lr


class ScheduleMixin:
    """HF Trainer mixin: the peak -> floor learning-rate schedule of ``TrainArgs``."""

    schedule: TrainArgs

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        """A LambdaLR following ``lr_multiplier`` (exact peak on the first step, floor on the last)."""
        import torch

        if self.lr_scheduler is None:
            t = self.schedule
            floor = t.min_learning_rate / t.learning_rate
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer,
                lambda s: lr_multiplier(s, num_training_steps, t.warmup_steps, floor, t.lr_schedule))
            self._created_lr_scheduler = True
        return self.lr_scheduler


# ---------------------------------------------------------------- TRL config

def liger_available() -> bool:
    """True when ``liger_kernel`` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("liger_kernel") is not None
    except (ImportError, ValueError):
        return False


def use_liger(t: TrainArgs) -> bool:
    """Whether Liger's kernels patch the model: ``use_liger_kernel``, or (null) a CUDA GPU with liger-kernel."""
    if t.use_liger_kernel is not None:
        return t.use_liger_kernel
    return on_gpu() and liger_available()


def trl_args(cls: type, t: TrainArgs, out_dir: Path, seed: int, run_name: str | None = None, **kw: Any) -> Any:
    """Build a TRL config (SFTConfig/DPOConfig/RewardConfig) from ``TrainArgs`` with CPU-safe defaults.

    Trackers are not passed to transformers (``report_to="none"``): ``begin`` attaches them as callbacks
    (``posttrain.core.tracking.hf_callbacks``) with their own folders and W&B names.
    """
    import torch

    gpu = on_gpu()
    bf16 = t.bf16 if t.bf16 is not None else bool(gpu and torch.cuda.is_bf16_supported())
    gc = t.gradient_checkpointing if t.gradient_checkpointing is not None else gpu
    liger = use_liger(t)
    # Liger's fused linear cross-entropy would replace the model's forward: TRL's chunked LM head (SFT, DPO)
    # would be dropped, and a reward model's classifier forward would become a causal LM's.
    liger_cfg = {**(t.extra.get("liger_kernel_config") or {}), "fused_linear_cross_entropy": False} if liger else None
    args = dict(
        output_dir=str(out_dir / "checkpoints"), learning_rate=t.learning_rate, num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps, per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_epsilon=t.adam_epsilon,
        optim=t.optim, bf16=bf16, gradient_checkpointing=gc, logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps else "no", save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit, seed=seed, data_seed=seed, use_cpu=not gpu,
        dataloader_num_workers=t.dataloader_num_workers, report_to="none",
        deepspeed=t.deepspeed, disable_tqdm=False, save_only_model=False, run_name=run_name,
        use_liger_kernel=liger,
    )
    args.update(kw)
    args.update(t.extra)
    if liger_cfg is not None:
        args["liger_kernel_config"] = liger_cfg
    return cls(**args)


# ---------------------------------------------------------------- callbacks

def loss_log_callback(path: Path, resume_step: int = 0) -> Any:
    """A TrainerCallback appending ``{step, epoch, loss, lr, ...}`` lines to ``path`` (rank 0 only)."""
    from transformers import TrainerCallback

    if is_main_process() and path.exists():
        # A resumed run replays the steps after its checkpoint: keep only earlier lines.
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
        path.write_text("".join(k + "\n" for k in keep))

    class LossLog(TrainerCallback):
        def __init__(self) -> None:
            self.lrs: dict[int, float] = {}

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):  # noqa: ANN001
            # The rate this optimizer step will use (the Trainer logs the *next* step's rate).
            if optimizer is not None:
                self.lrs[state.global_step + 1] = float(optimizer.param_groups[0]["lr"])

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            rec = {"step": state.global_step, "epoch": logs.get("epoch", state.epoch), "loss": logs["loss"],
                   "lr": self.lrs.get(state.global_step, logs.get("learning_rate")),
                   "grad_norm": logs.get("grad_norm"), "num_tokens": logs.get("num_tokens"), "time": time.time()}
            rec.update({k: v for k, v in logs.items() if k.startswith("rewards/")})
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")

    return LossLog()


# ---------------------------------------------------------------- loading and saving

def prepare_moe(model: Any) -> list[str]:
    """Mixture-of-experts models under DeepSpeed ZeRO-3: register each sparse MoE block as a ZeRO-3 leaf.

    ZeRO-3 gathers parameters module by module as the forward reaches them; tokens routed to
    different experts on different ranks would make the ranks gather different modules and hang.
    A leaf block is gathered whole. Returns the registered class names ([] for dense models). The
    router's load-balancing loss is added by TRL with the model's own ``router_aux_loss_coef``.
    DeepSpeed is recognised from the launcher (accelerate) or from ``train.deepspeed`` (torchrun):
    transformers sets ``ACCELERATE_USE_DEEPSPEED`` only briefly, but keeps its ZeRO-3 config active.
    """
    import sys

    if not getattr(model.config, "num_experts", None):
        return []
    blocks = sorted({type(m) for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock")},
                    key=lambda c: c.__name__)
    hfds = sys.modules.get("transformers.integrations.deepspeed")
    zero3 = hfds is not None and hfds.is_deepspeed_zero3_enabled()
    if blocks and (deepspeed_requested() or zero3):
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, blocks)
    return [c.__name__ for c in blocks]


def master_dtype(dtype: str) -> str:
    """The dtype of weights an optimizer steps: float32 whenever the compute dtype is a 16-bit one.

    A model loaded in bf16 and stepped by AdamW loses every update smaller than half a bf16 step
    (at 7e-6 most weights never move); loaded in fp32 it trains under the trainer's bf16 autocast
    (``bf16: true``), or DeepSpeed keeps the fp32 master copy and computes in bf16.
    """
    return "float32" if dtype_name(dtype) in ("bfloat16", "float16") else dtype


def load_causal_lm(path: str, dtype: str, attn: str, trainable: bool = True) -> Any:
    """Load a causal LM (``dtype: auto`` = bf16 on a bf16 GPU, else fp32); MoE prepared for ZeRO-3.

    A ``trainable`` model gets fp32 master weights (``master_dtype``); a frozen one (a DPO reference)
    is loaded in ``dtype`` itself.
    """
    from transformers import AutoModelForCausalLM

    if attn == CPU_VARLEN:
        register_sdpa_varlen()
    load = master_dtype(dtype) if trainable else dtype
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(load), attn_implementation=attn)
    prepare_moe(model)
    return model


def last_checkpoint(out_dir: Path) -> str | None:
    """Newest ``checkpoints/checkpoint-N`` folder, if any."""
    from transformers.trainer_utils import get_last_checkpoint

    d = out_dir / "checkpoints"
    return get_last_checkpoint(str(d)) if d.is_dir() else None


def save_final(trainer: Any, out_dir: Path, tokenizer: Any, lora: LoraSection | None, base_path: str,
               dtype: str, load_base: Any = None) -> str:
    """Save the trained model into ``out_dir`` (merging a LoRA adapter when asked); return what was saved.

    ``load_base()`` builds the fresh model the adapter is merged into (default: the causal LM at ``base_path``).
    """
    if lora is None:
        trainer.save_model(str(out_dir))
        if is_main_process():
            tokenizer.save_pretrained(str(out_dir))
        return "full"
    adapter = out_dir / "adapter" if lora.merge else out_dir
    trainer.save_model(str(adapter))  # gathers ZeRO-3 shards before writing
    if is_main_process():
        tokenizer.save_pretrained(str(out_dir))
        if lora.merge:
            from peft import PeftModel

            # Merge on a fresh CPU copy: the training copy may be sharded (ZeRO-3) or in bf16 autocast.
            with plain_loading():  # rank 0 alone: a ZeRO-3 init here would wait for the other ranks
                base = load_base() if load_base else load_causal_lm(base_path, dtype, "sdpa")
            merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
            merged.save_pretrained(str(out_dir))
    return "lora-merged" if lora.merge else "lora-adapter"


def dataset_on_disk(rows: list[dict], folder: Path) -> Any:
    """A datasets.Dataset backed by files in ``folder`` that every rank shares.

    In-memory datasets cache derived columns (e.g. TRL's precomputed reference log-probs) in a
    per-process temp folder, which other ranks cannot see; a saved dataset caches next to itself.
    Rank 0 writes (the folder name hashes the content), the others wait for its marker file.
    """
    import datasets

    digest = hashlib.sha1(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:12]
    d = folder / digest
    done = d / ".complete"
    if is_main_process() and not done.exists():
        tmp = folder / f".{digest}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp))
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
        done.write_text("ok")
    deadline = time.time() + 1800
    while not done.exists():
        if time.time() > deadline:
            raise TimeoutError(f"{d}: rank 0 did not write the dataset")
        time.sleep(0.5)
    return datasets.load_from_disk(str(d))


# ---------------------------------------------------------------- preamble / epilogue of a trainer stage

@dataclass
class TrainerRun:
    """What ``begin`` resolved for one trainer stage; ``finish`` and the stage's trainer builder read it."""

    cfg: Any  # the stage config, with train.deepspeed resolved from the recipe's folder
    ctx: Any
    model_path: str
    tokenizer: Any
    seed: int
    dtype: str
    attn: str
    resume: str | None
    resume_step: int
    callbacks: list

    @property
    def out_dir(self) -> Path:
        """The stage folder."""
        return Path(self.ctx.out_dir)


def begin(cfg: Any, ctx: Any, *, packed: bool = False) -> TrainerRun:
    """The shared preamble of a trainer stage (see the module docstring); call before reading data."""
    if cfg.train.deepspeed:  # a copy: the recipe's own config (and its fingerprint) stays as written
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, deepspeed=ctx.resolve(cfg.train.deepspeed)))
    setup_distributed(cfg.train.deepspeed)
    model_path = ctx.model_path(cfg.model)
    tok = ctx.tokenizer(model_path)
    resume = last_checkpoint(ctx.out_dir) if cfg.resume else None
    resume_step = int(resume.rsplit("-", 1)[1]) if resume else 0
    seed = cfg.train.seed if cfg.train.seed is not None else ctx.seed
    attn = pick_attention(cfg.attn_implementation, ctx.recipe.file.model.attn_implementation, packed=packed)
    callbacks = [loss_log_callback(Path(ctx.out_dir) / "loss_log.jsonl", resume_step),
                 *hf_callbacks(cfg.train.report_to, ctx)]  # starts the stage's W&B run when asked
    if resume:
        log.info("stage %s: resuming from %s", ctx.spec.name, resume)
    return TrainerRun(cfg, ctx, model_path, tok, seed, ctx.recipe.file.model.dtype, attn, resume, resume_step,
                      callbacks)


def finish(run: TrainerRun, trainer: Any, result: Any, *, load_base: Any = None) -> dict:
    """The shared epilogue: end the W&B run, save (merging LoRA), drop checkpoints/_data as configured, wait for
    rank 0. Call it after the stage's last evaluation (its metrics go to the trackers). Returns the common part of
    the stage manifest's summary.
    """
    cfg = run.cfg
    finish_wandb()
    saved = save_final(trainer, run.out_dir, run.tokenizer, cfg.lora, run.model_path, run.dtype, load_base)
    if is_main_process():
        if not cfg.train.keep_checkpoints:
            shutil.rmtree(run.out_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(run.out_dir / "_data", ignore_errors=True)
    barrier()
    moe = prepare_moe(trainer.model) if hasattr(trainer.model, "config") else []
    return {"model": str(run.out_dir), "saved": saved, "steps": trainer.state.global_step,
            "resumed_from": run.resume, "metrics": dict(result.metrics), "distributed": distributed_info(trainer),
            "attn_implementation": run.attn, "lora": asdict(cfg.lora) if cfg.lora else None,
            "moe": {"leaf_modules": moe, "router_aux_loss_coef": getattr(trainer, "router_aux_loss_coef", None)}
            if moe else None}
