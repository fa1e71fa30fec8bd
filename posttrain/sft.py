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
trained (templates without markers are patched with TRL's training templates
when TRL knows them). Over-long rows are truncated or dropped (``overlong``)
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

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from posttrain.recipe import input_field
from posttrain.records import iter_records

log = logging.getLogger("posttrain")

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------- config

@dataclass
class TrainArgs:
    """Optimizer, schedule and Trainer settings (``stages[i].train.*``); shared by sft and dpo."""

    learning_rate: float = 7e-6  # peak rate (Qwen2 report, SFT: 7e-6)
    min_learning_rate: float = 7e-7  # floor reached on the last step (Qwen2 report, SFT: 7e-7)
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"  # decay shape from peak to floor
    warmup_steps: int = 0  # linear warm-up steps before the decay (0: first step runs at the peak)
    num_train_epochs: float = 2.0  # Qwen2 report: 2 epochs
    max_steps: int = -1  # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 1  # packed rows (sft) or pairs (dpo) per device per micro-step
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step
    weight_decay: float = 0.1  # Qwen2 report: 0.1
    max_grad_norm: float = 1.0  # gradient clipping (Qwen2 report: 1.0)
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.95  # AdamW beta2 (0.95 is the usual large-LM choice)
    adam_epsilon: float = 1e-8  # AdamW epsilon
    optim: str = "adamw_torch"  # any transformers `optim` name
    bf16: bool | None = None  # null: on when a CUDA GPU with bf16 is present (CPU has no bf16 units)
    gradient_checkpointing: bool | None = None  # null: on with a GPU, off on CPU (5-15x slower there)
    logging_steps: int = 1  # log (and write loss_log.jsonl) every N optimizer steps
    save_steps: int | None = None  # checkpoint every N steps (null: only the final model)
    save_total_limit: int | None = 2  # checkpoints kept in checkpoints/
    keep_checkpoints: bool = True  # false: delete checkpoints/ after the final model is saved
    deepspeed: str | None = input_field(None)  # DeepSpeed JSON (or set it in the accelerate config)
    seed: int | None = None  # null: the recipe seed + stage index
    dataloader_num_workers: int = 0  # DataLoader workers
    report_to: list[str] = field(default_factory=list)  # e.g. [tensorboard, wandb]
    extra: dict[str, Any] = field(default_factory=dict)  # passed verbatim to the TRL config class

    def check(self) -> None:
        """Cross-field rules."""
        if self.learning_rate <= 0 or self.min_learning_rate < 0 or self.min_learning_rate > self.learning_rate:
            raise ValueError("need 0 <= min_learning_rate <= learning_rate and learning_rate > 0")
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("per_device_train_batch_size and gradient_accumulation_steps must be >= 1")


@dataclass
class LoraSection:
    """LoRA adapter settings (``stages[i].lora.*``); absent section = full fine-tuning."""

    r: int = 16  # adapter rank
    alpha: int = 32  # scaling numerator (scale = alpha / r)
    dropout: float = 0.05  # dropout on the adapter input
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))  # module names to adapt
    merge: bool = True  # merge the adapter into the base and save a full model (else save the adapter only)


@dataclass
class SFTStageConfig:
    """Stage ``sft``: supervised fine-tuning on demonstrations (assistant-only loss, packed, padding-free)."""

    input: str = input_field()  # demonstration records (file or @stage)
    eval_input: str | None = input_field(None)  # held-out demonstrations: eval loss logged at the end
    model: str | None = None  # model to fine-tune (default: recipe model.path)
    max_length: int = 4096  # tokens per packed row (Qwen2 report: 32768)
    overlong: Literal["truncate", "drop"] = "drop"  # rows longer than max_length: cut at max_length, or skip
    packing: bool = True  # best-fit-decreasing packing into max_length bins, padding-free
    assistant_only_loss: bool = True  # train only assistant tokens (+ their end-of-turn token)
    loss: Literal["chunked", "naive"] = "chunked"  # chunked LM-head loss (no full logits) or full logits
    attn_implementation: str | None = None  # null: flash_attention_2 on GPU when installed, else model.attn_implementation
    limit: int | None = None  # use only the first N records
    resume: bool = True  # continue from the newest checkpoint in checkpoints/ when present
    lora: LoraSection | None = None  # LoRA instead of full fine-tuning
    train: TrainArgs = field(default_factory=TrainArgs)  # optimizer / schedule / Trainer settings

    def check(self) -> None:
        """Cross-field rules."""
        if self.max_length < 16:
            raise ValueError("max_length must be >= 16")


# ---------------------------------------------------------------- pure helpers

def lr_multiplier(step: int, total: int, warmup: int, floor_ratio: float, shape: str) -> float:
    """Learning-rate factor (times the peak) for optimizer step ``step`` (0-based) of ``total``.

    Warm-up rises linearly to 1 over ``warmup`` steps; then the factor decays from 1 at step
    ``warmup`` to ``floor_ratio`` at step ``total - 1`` (linear or cosine), and stays there.
    """
    if shape == "constant":
        return 1.0
    if step < warmup:
        return (step + 1) / (warmup + 1)
    span = max(1, total - 1 - warmup)
    p = min(1.0, (step - warmup) / span)
    if shape == "cosine":
        return floor_ratio + (1 - floor_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    return 1.0 - (1.0 - floor_ratio) * p


class BadInput(ValueError):
    """The training data or tokenizer cannot be used; the message names the file/row."""


def training_template(tokenizer: Any, source: str = "tokenizer") -> str:
    """The chat template to tokenize with: the tokenizer's, or TRL's training variant with generation markers."""
    tmpl = getattr(tokenizer, "chat_template", None)
    if not tmpl:
        raise BadInput(f"{source}: the tokenizer has no chat template (set tokenizer.chat_template in the recipe "
                       "to a Jinja file)")
    if isinstance(tmpl, dict):
        tmpl = tmpl.get("default") or next(iter(tmpl.values()))
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tmpl):
        return tmpl
    try:
        patched = get_training_chat_template(tokenizer)
    except Exception as e:  # noqa: BLE001 - TRL raises ValueError/KeyError for unknown templates
        raise BadInput(f"{source}: the chat template has no {{% generation %}} markers, so assistant tokens cannot "
                       f"be located ({e}); add the markers or set assistant_only_loss: false") from None
    return patched or tmpl


def tokenize_conversation(tokenizer: Any, messages: list[dict], template: str | None,
                          assistant_only: bool = True) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one conversation; labels are -100 outside assistant spans.

    The assistant span is what the template wraps in ``{% generation %}``: the reply text
    and its end-of-turn token, never the ``<|im_start|>assistant`` header.
    """
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, chat_template=template,
                                        return_assistant_tokens_mask=assistant_only)
    ids = list(enc["input_ids"])
    if not assistant_only:
        return ids, list(ids)
    mask = enc["assistant_masks"]
    return ids, [t if m else -100 for t, m in zip(ids, mask)]


def prepare_rows(records: list[dict], tokenizer: Any, template: str | None, max_length: int,
                 overlong: str, assistant_only: bool, source: str) -> tuple[list[dict], dict]:
    """Tokenize demonstrations; skip rows without an assistant turn, truncate/drop over-long rows.

    Returns (rows ``{"input_ids", "labels"}``, counts). Raises BadInput when nothing is trainable.
    """
    st = {"records": len(records), "skipped_no_assistant": 0, "truncated": 0, "dropped_overlong": 0,
          "dropped_no_trainable": 0}
    rows = []
    for rec in records:
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


# ---------------------------------------------------------------- shared trainer plumbing

def on_gpu() -> bool:
    """True when a CUDA device is usable."""
    import torch

    return torch.cuda.is_available()


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (or a plain process)."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process): rank 0 writes outputs the next stage reads."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def distributed_info(trainer: Any) -> dict:
    """World size and DeepSpeed ZeRO stage the trainer actually ran with (for the manifest)."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None) if trainer.is_deepspeed_enabled else None
    return {"world_size": trainer.args.world_size, "deepspeed": bool(plugin),
            "zero_stage": plugin.zero_stage if plugin else None,
            "backend": str(getattr(trainer.args, "ddp_backend", None) or trainer.accelerator.state.backend)}


def setup_distributed(deepspeed_config: str | None = None) -> None:
    """Prepare DeepSpeed on CPU: pick its CPU accelerator and a gloo group before models are built.

    ZeRO-3 partitions parameters while ``from_pretrained`` runs, so the process group must exist
    first; on GPUs accelerate does this itself with NCCL.
    """
    if on_gpu():
        return
    ds = bool(deepspeed_config) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or ds:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if ds and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import deepspeed
        import torch.distributed as dist

        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="gloo")


def trl_args(cls: type, t: TrainArgs, out_dir: Path, seed: int, **kw: Any) -> Any:
    """Build a TRL config (SFTConfig/DPOConfig) from ``TrainArgs`` with CPU-safe defaults."""
    gpu = on_gpu()
    import torch

    bf16 = t.bf16 if t.bf16 is not None else bool(gpu and torch.cuda.is_bf16_supported())
    gc = t.gradient_checkpointing if t.gradient_checkpointing is not None else gpu
    args = dict(
        output_dir=str(out_dir / "checkpoints"), learning_rate=t.learning_rate, num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps, per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_epsilon=t.adam_epsilon,
        optim=t.optim, bf16=bf16, gradient_checkpointing=gc, logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps else "no", save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit, seed=seed, data_seed=seed, use_cpu=not gpu,
        dataloader_num_workers=t.dataloader_num_workers, report_to=list(t.report_to) or "none",
        deepspeed=t.deepspeed, disable_tqdm=False, save_only_model=False,
    )
    args.update(kw)
    args.update(t.extra)
    return cls(**args)


class ScheduleMixin:
    """Trainer mixin: the peak->floor learning-rate schedule of ``TrainArgs``."""

    schedule: TrainArgs

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        """A LambdaLR following ``lr_multiplier`` (exact peak on the first step, floor on the last)."""
        import torch

        if self.lr_scheduler is None:
            t = self.schedule
            opt = optimizer or self.optimizer
            floor = t.min_learning_rate / t.learning_rate
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: lr_multiplier(s, num_training_steps, t.warmup_steps, floor, t.lr_schedule))
            self._created_lr_scheduler = True
        return self.lr_scheduler


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


def load_causal_lm(path: str, dtype: str, attn: str) -> Any:
    """Load a causal LM for training (float32 on CPU when dtype is auto)."""
    import torch
    from transformers import AutoModelForCausalLM

    if dtype == "auto":
        dt = torch.bfloat16 if on_gpu() and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dt = getattr(torch, dtype)
    if attn == CPU_VARLEN:
        register_sdpa_varlen()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dt, attn_implementation=attn)


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


def load_tokenizer(ctx: Any, model_path: str) -> Any:
    """The stage tokenizer, with the recipe's chat-template file applied when set."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ctx.tokenizer_path(model_path))
    tmpl_file = ctx.recipe.file.tokenizer.chat_template
    if tmpl_file:
        tok.chat_template = Path(ctx.resolve(tmpl_file)).read_text(encoding="utf-8")
    return tok


def lora_config(sec: LoraSection) -> Any:
    """A peft LoraConfig from the recipe section."""
    from peft import LoraConfig

    return LoraConfig(r=sec.r, lora_alpha=sec.alpha, lora_dropout=sec.dropout,
                      target_modules=list(sec.target_modules), task_type="CAUSAL_LM")


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


# ---------------------------------------------------------------- the trainer

def _sft_trainer_class() -> type:
    """SFTTrainer + our schedule, and an optional naive (full-logits) loss for benchmarks."""
    import torch
    from trl import SFTTrainer

    class PosttrainSFTTrainer(ScheduleMixin, SFTTrainer):
        naive_loss = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
            if not self.naive_loss:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs["labels"]
            kw = {k: v for k, v in inputs.items() if k not in ("labels",)}
            kw["use_cache"] = False
            logits = model(**kw).logits.float()  # the full tokens x vocab tensor this mode exists to measure
            # Shift the labels, not the logits: slicing the logits would copy the whole tensor once more.
            tgt = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
            loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), tgt.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            n = num_items_in_batch if num_items_in_batch is not None else tgt.ne(-100).sum()
            loss = loss / torch.as_tensor(n).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return loss

    return PosttrainSFTTrainer


def build_sft_trainer(cfg: SFTStageConfig, model_path: str, tokenizer: Any, train_rows: list[dict],
                      eval_rows: list[dict] | None, out_dir: Path, seed: int, dtype: str = "auto",
                      attn: str | None = None, callbacks: list | None = None) -> Any:
    """The configured trainer (also used by tests and the benchmark); ``attn`` null: ``pick_attention``."""
    attn = attn or pick_attention(cfg.attn_implementation, "sdpa", packed=cfg.packing)
    from trl import SFTConfig

    setup_distributed(cfg.train.deepspeed)
    args = trl_args(SFTConfig, cfg.train, out_dir, seed, max_length=cfg.max_length, packing=cfg.packing,
                    packing_strategy="bfd", padding_free=cfg.packing, dataset_num_proc=None,
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
    if cfg.train.deepspeed:  # a copy: the recipe's own config (and its fingerprint) stays as written
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, deepspeed=ctx.resolve(cfg.train.deepspeed)))
    model_path = ctx.model_path(cfg.model)
    tok = load_tokenizer(ctx, model_path)
    src = ctx.resolve(cfg.input)
    template = training_template(tok, ctx.tokenizer_path(model_path)) if cfg.assistant_only_loss else None
    records = list(iter_records(src, "demonstration"))
    if cfg.limit is not None:
        records = records[: cfg.limit]
    rows, stats = prepare_rows(records, tok, template, cfg.max_length, cfg.overlong, cfg.assistant_only_loss, src)
    eval_rows = None
    if cfg.eval_input:
        esrc = ctx.resolve(cfg.eval_input)
        eval_rows, estats = prepare_rows(list(iter_records(esrc, "demonstration")), tok, template, cfg.max_length,
                                         cfg.overlong, cfg.assistant_only_loss, esrc)
        stats["eval"] = estats
    for k in ("skipped_no_assistant", "truncated", "dropped_overlong", "dropped_no_trainable"):
        if stats[k]:
            log.warning("sft %s: %d rows %s", src, stats[k], k.replace("_", " "))
    if is_main_process():
        ctx.write_json("data_stats.json", stats)
    resume = last_checkpoint(ctx.out_dir) if cfg.resume else None
    resume_step = int(resume.rsplit("-", 1)[1]) if resume else 0
    seed = cfg.train.seed if cfg.train.seed is not None else ctx.seed
    attn = pick_attention(cfg.attn_implementation, ctx.recipe.file.model.attn_implementation, packed=cfg.packing)
    trainer = build_sft_trainer(cfg, model_path, tok, rows, eval_rows, ctx.out_dir, seed,
                                ctx.recipe.file.model.dtype, attn,
                                callbacks=[loss_log_callback(ctx.out_dir / "loss_log.jsonl", resume_step)])
    if resume:
        log.info("sft: resuming from %s", resume)
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(result.metrics)
    if eval_rows:
        metrics.update(trainer.evaluate())
    saved = save_final(trainer, ctx.out_dir, tok, cfg.lora, model_path, ctx.recipe.file.model.dtype)
    if is_main_process() and not cfg.train.keep_checkpoints:
        shutil.rmtree(ctx.out_dir / "checkpoints", ignore_errors=True)
    if is_main_process():
        shutil.rmtree(ctx.out_dir / "_data", ignore_errors=True)
    barrier()
    return {"model": str(ctx.out_dir), "saved": saved, "steps": trainer.state.global_step,
            "resumed_from": resume, "data": stats, "metrics": metrics,
            "distributed": distributed_info(trainer), "attn_implementation": attn,
            "lora": asdict(cfg.lora) if cfg.lora else None}
