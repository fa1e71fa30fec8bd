"""Stage ``reward``: a Bradley-Terry reward model trained on preference records.

Input: preference records (``{"prompt", "chosen", "rejected", "source",
"meta"}``, optional float ``margin``; JSONL, Parquet, a ``datasets`` folder or
an ``@stage`` reference) and a starting model: the policy or SFT folder (a
causal LM: its trunk is kept and a fresh ``score`` head is added) or an
existing sequence-classification folder (e.g. the tiny model's ``reward/``).

Output, in the stage folder (so later stages name ``@reward`` as a reward model):

* the reward model (``AutoModelForSequenceClassification``, ``num_labels=1``,
  the policy architecture) + tokenizer, readable by ``reward.scorer.RewardScorer``;
  with LoRA and ``lora.merge`` the merged model, the adapter kept in ``adapter/``;
* ``eval.json``: held-out accuracy (ties count 1/2), mean margin (chosen minus
  rejected score), Bradley-Terry loss, and the same broken down by ``source``
  and each ``breakdown`` field; the same numbers on a sample of training pairs;
* ``eval_scores.jsonl``: per held-out pair ``{id, source, chosen, rejected}`` scores;
* ``loss_log.jsonl``: ``{step, epoch, loss, lr, grad_norm, rewards/accuracy,
  rewards/margin, ...}`` per logged step; ``data_stats.json``: rows read,
  skipped (chosen == rejected), duplicate ids, over-long pairs dropped, split sizes;
  ``checkpoints/`` (HF Trainer checkpoints, used to resume).

Loss: ``-log sigmoid(r_chosen - r_rejected - margin)`` (Bradley-Terry; the
margin term is Llama 2's, section 3.2.2, used when rows carry ``margin`` and
``use_margin`` is on; rows without one get 0), optionally plus TRL's reward
centring term. ``packing: true`` trains padding-free (``reward.packed``: each
micro-batch's conversations packed into one row, per-document attention, the
score read at each conversation's last token, as the scorer reads it). Training
runs through TRL's ``RewardTrainer`` with the shared
trainer plumbing of ``posttrain.trainers.sft`` (schedule with floor, loss log, DeepSpeed
set-up, checkpoints), so the same accelerate/DeepSpeed launches work.
Held-out scoring goes through ``RewardScorer`` on the saved folder, i.e. the
exact path synthesis stages and online DPO use.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from posttrain.core.attention import CPU_VARLEN, register_sdpa_varlen
from posttrain.core.config import key
from posttrain.core.inputs import PreferenceInputs
from posttrain.core.inputs import input_label as _label
from posttrain.core.devices import torch_dtype
from posttrain.core.distributed import barrier, is_main_process, setup_distributed
from posttrain.core.errors import BadInput
from posttrain.core.trainkit import (LoraSection, ScheduleMixin, TrainArgs, begin, dataset_on_disk, finish,
                                     lora_config, master_dtype, prepare_moe, trl_args)

log = logging.getLogger("posttrain")


def _reward_train_defaults() -> TrainArgs:
    # Llama 2 (Touvron et al. 2023, section 3.2.2) trains reward models for one epoch at 1e-5
    # (5e-6 for 70B) with cosine decay to 10% of the peak; the Qwen2 report gives no RM numbers.
    return TrainArgs(learning_rate=1e-5, min_learning_rate=1e-6, lr_schedule="cosine", num_train_epochs=1.0,
                     per_device_train_batch_size=8)


@dataclass
class RewardStageConfig(PreferenceInputs):
    """Stage ``reward``: Bradley-Terry reward model (sequence-classification head) on preference records."""

    eval_fraction: float = key(0.1, "share of input held out when eval_input is unset (0: no held-out eval)")
    split_by: Literal["prompt", "row"] = key("prompt", "held-out unit: whole prompts (no prompt in both) or rows")
    model: str | None = key(None, "starting model: policy/SFT folder or a reward folder (default: recipe model.path)",
                            model=True)
    max_length: int = key(2048, "pairs whose chosen or rejected conversation is longer are dropped (counted)")
    use_margin: bool = key(True, "use the records' `margin` column in the loss when present (Llama 2 margin loss)")
    center_rewards_coefficient: float | None = key(None, "TRL's reward-centring penalty (e.g. 0.01); null: off")
    breakdown: list[str] = key(factory=list, doc="extra held-out breakdowns: \"meta.KEY\" or a record key")
    train_eval_limit: int = key(256, "training pairs also scored after training (fit check; 0: none)")
    eval_batch_size: int = key(16, "conversations per scoring forward pass")
    packing: bool = key(False, "padding-free: each micro-batch's chosen and rejected conversations packed into one "
                        "row (per-document sdpa on CPU, flash-attention varlen on GPU)")
    attn_implementation: str | None = key(None, "null: flash_attention_2 on GPU when installed, else model.attn_implementation")
    limit: int | None = key(None, "use only the first N input records")
    resume: bool = key(True, "continue from the newest checkpoint in checkpoints/ when present")
    lora: LoraSection | None = key(None, "LoRA (score head fully trained) instead of full fine-tuning")
    train: TrainArgs = key(factory=_reward_train_defaults, doc="optimizer / schedule / Trainer settings")

    def check(self) -> None:
        """Cross-field rules."""
        self.check_inputs()
        if self.max_length < 8:
            raise ValueError("max_length must be >= 8")
        for b in self.breakdown:
            if not b or b == "meta.":
                raise ValueError(f"breakdown: bad field {b!r} (use 'meta.KEY' or a record key)")
        if self.packing:
            from reward.packed import INERT_ARGS

            inert = sorted(set(self.train.extra) & set(INERT_ARGS))
            if inert:
                raise ValueError(f"train.extra.{inert[0]} has no effect with packing: true (remove it)")


# ---------------------------------------------------------------- pure helpers

def bradley_terry_loss(chosen: Any, rejected: Any, margin: Any = None) -> Any:
    """Mean ``-log sigmoid(chosen - rejected - margin)`` over pairs (torch tensors; margin optional)."""
    import torch.nn.functional as F

    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def pair_metrics(chosen: list[float], rejected: list[float]) -> dict:
    """Accuracy (ties count 1/2), ties, mean margin and BT loss of scored pairs."""
    n = len(chosen)
    if n == 0:
        return {"n": 0, "accuracy": None, "ties": 0, "mean_margin": None, "loss": None}
    d = [c - r for c, r in zip(chosen, rejected)]
    wins = sum(x > 0 for x in d)
    ties = sum(x == 0 for x in d)
    # log(1 + exp(-d)) computed stably for large |d|
    loss = sum(max(-x, 0.0) + math.log1p(math.exp(-abs(x))) for x in d) / n
    return {"n": n, "accuracy": (wins + 0.5 * ties) / n, "ties": ties, "mean_margin": sum(d) / n, "loss": loss}


def group_value(rec: dict, key: str) -> str:
    """The breakdown category of a record: ``source``, ``meta.KEY`` or another top-level key."""
    if key.startswith("meta."):
        v = (rec.get("meta") or {}).get(key[5:])
    else:
        v = rec.get(key)
    return "<none>" if v is None else str(v)


def breakdown_metrics(records: list[dict], chosen: list[float], rejected: list[float], key: str) -> dict:
    """``pair_metrics`` per category of ``key``, categories sorted."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(group_value(r, key), []).append(i)
    return {g: pair_metrics([chosen[i] for i in idx], [rejected[i] for i in idx]) for g, idx in sorted(groups.items())}


def _messages_key(msgs: list[dict]) -> list[tuple[str, str]]:
    return [(m.get("role"), m.get("content")) for m in msgs]


def clean_pairs(records: list[dict], source: str) -> tuple[list[dict], dict]:
    """Drop pairs whose chosen equals rejected and repeated ids; return (kept, counts).

    Raises BadInput (naming ``source``) when there are no records or nothing is left.
    """
    st = {"records": len(records), "skipped_identical": 0, "duplicate_ids": 0}
    if not records:
        raise BadInput(f"{source}: no preference records")
    seen: set[str] = set()
    kept = []
    for r in records:
        if _messages_key(r["chosen"]) == _messages_key(r["rejected"]):
            st["skipped_identical"] += 1  # no preference signal, and a zero-gradient pair
            continue
        if r["id"] in seen:
            st["duplicate_ids"] += 1
            continue
        seen.add(r["id"])
        kept.append(r)
    if not kept:
        raise BadInput(f"{source}: none of {len(records)} preference rows is usable ({json.dumps(st)})")
    st["pairs"] = len(kept)
    return kept, st


def split_heldout(records: list[dict], fraction: float, by: str, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic (train, held-out) split; ``by="prompt"`` keeps all pairs of a prompt on one side."""
    if fraction <= 0:
        return list(records), []

    def unit(r: dict) -> str:
        return json.dumps(r["prompt"], sort_keys=True) if by == "prompt" else r["id"]

    units = sorted({unit(r) for r in records},
                   key=lambda u: hashlib.sha1(f"{seed}:{u}".encode()).hexdigest())
    if len(units) < 2:
        return list(records), []
    n_eval = min(len(units) - 1, max(1, round(fraction * len(units))))
    held = set(units[:n_eval])
    return [r for r in records if unit(r) not in held], [r for r in records if unit(r) in held]


def tokenize_pairs(records: list[dict], tokenizer: Any, max_length: int, use_margin: bool,
                   source: str) -> tuple[list[dict], list[dict], int]:
    """Token ids of prompt+chosen / prompt+rejected via the chat template; drop over-long pairs.

    Returns (rows ``{"chosen_ids", "rejected_ids"[, "margin"]}``, the records kept, number dropped).
    """
    with_margin = use_margin and any(r.get("margin") is not None for r in records)
    rows, kept, dropped = [], [], 0
    for r in records:
        try:
            c = tokenizer.apply_chat_template(r["prompt"] + r["chosen"], tokenize=True, return_dict=True)["input_ids"]
            j = tokenizer.apply_chat_template(r["prompt"] + r["rejected"], tokenize=True, return_dict=True)["input_ids"]
        except Exception as e:  # noqa: BLE001 - jinja raises many types; name the row
            raise BadInput(f"{source}: record {r['id']}: chat template failed ({type(e).__name__}: {e})") from None
        if len(c) > max_length or len(j) > max_length:
            dropped += 1
            continue
        row = {"chosen_ids": list(c), "rejected_ids": list(j)}
        if with_margin:
            row["margin"] = float(r.get("margin") or 0.0)
        rows.append(row)
        kept.append(r)
    return rows, kept, dropped


# ---------------------------------------------------------------- evaluation

def evaluate_records(scorer: Any, records: list[dict], breakdown: list[str]) -> tuple[dict, list[dict]]:
    """Score chosen and rejected of each record; return (metrics with breakdowns, per-pair scores)."""
    convs = [r["prompt"] + r["chosen"] for r in records] + [r["prompt"] + r["rejected"] for r in records]
    scores = scorer.score_messages(convs)
    n = len(records)
    ch, rj = scores[:n], scores[n:]
    out = pair_metrics(ch, rj)
    for field_name in ["source", *[b for b in breakdown if b != "source"]]:
        out[f"by_{field_name}"] = breakdown_metrics(records, ch, rj, field_name)
    per_pair = [{"id": r["id"], "source": r.get("source"), "chosen": c, "rejected": j}
                for r, c, j in zip(records, ch, rj)]
    return out, per_pair


# ---------------------------------------------------------------- trainer

def _reward_trainer_class(packed: bool = False) -> type:
    """TRL's RewardTrainer + the peak->floor schedule, with accuracy/margin in the loss log (packed: ``reward.packed``)."""
    from trl import RewardTrainer

    from reward.packed import PackedRewardMixin

    mixins = (PackedRewardMixin,) if packed else ()

    class PosttrainRewardTrainer(*mixins, ScheduleMixin, RewardTrainer):
        def log(self, logs: dict, start_time: float | None = None) -> None:  # noqa: D102
            # TRL adds its batch metrics inside log(); copy them under "rewards/" first so the
            # shared loss-log callback (which keeps rewards/* keys) records them per step.
            metrics = getattr(self, "_metrics", {}).get("train" if self.model.training else "eval", {})
            for k in ("accuracy", "margin", "mean_reward"):
                if metrics.get(k):
                    logs[f"rewards/{k}"] = sum(metrics[k]) / len(metrics[k])
            super().log(logs, start_time)

    return PosttrainRewardTrainer


def load_reward_model(path: str, dtype: str, attn: str, pad_token_id: int | None, seed: int) -> Any:
    """A ``num_labels=1`` sequence classifier from a reward folder or a causal-LM folder (fresh head)."""
    from transformers import AutoModelForSequenceClassification, set_seed
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    set_seed(seed)  # the new score head of a causal-LM start is drawn here
    with suppress_seqcls_warning():  # the dropped lm_head and the new score head are expected
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch_dtype(master_dtype(dtype)),
                                                                   attn_implementation=attn)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id  # sequence classifiers pool at the last non-pad token
    model.config.use_cache = False
    prepare_moe(model)
    return model


def build_reward_trainer(cfg: RewardStageConfig, model_path: str, tokenizer: Any, rows: list[dict], out_dir: Path,
                         seed: int, dtype: str = "auto", attn: str = "sdpa", callbacks: list | None = None,
                         run_name: str | None = None) -> Any:
    """The configured trainer, padded (TRL's) or packed (``cfg.packing``); also used by tests and the benchmark."""
    from trl import RewardConfig

    if attn == CPU_VARLEN:
        register_sdpa_varlen()
    setup_distributed(cfg.train.deepspeed)
    args = trl_args(RewardConfig, cfg.train, out_dir, seed, run_name=run_name, max_length=cfg.max_length,
                    center_rewards_coefficient=cfg.center_rewards_coefficient, dataset_num_proc=None,
                    eval_strategy="no", disable_dropout=True)
    model = load_reward_model(model_path, dtype, attn, tokenizer.pad_token_id, seed)  # after args: ZeRO-3 init
    train_ds = dataset_on_disk(rows, out_dir / "_data")
    cls = _reward_trainer_class(cfg.packing)
    peft = lora_config(cfg.lora, "SEQ_CLS", modules_to_save=["score"]) if cfg.lora else None
    trainer = cls(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer, peft_config=peft,
                  callbacks=callbacks or [])
    trainer.schedule = cfg.train
    return trainer


# ---------------------------------------------------------------- entry

def run(cfg: RewardStageConfig, ctx: Any) -> dict:
    """Entry point of stage kind ``reward``."""
    tr = begin(cfg, ctx, packed=cfg.packing)
    cfg, tok = tr.cfg, tr.tokenizer
    if not getattr(tok, "chat_template", None):
        raise BadInput(f"{ctx.tokenizer_path(tr.model_path)}: the tokenizer has no chat template (set "
                       "tokenizer.chat_template in the recipe to a Jinja file)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # sequence classifiers need a pad id to find the last token
    src = _label(cfg.input)
    records, stats = clean_pairs(ctx.read_input(cfg.input, "preference", cfg.limit), src)
    stats["input"] = ctx.input_stats
    esrc = _label(cfg.eval_input) if cfg.eval_input else src
    if cfg.eval_input:
        train_recs = records
        eval_recs, estats = clean_pairs(ctx.read_input(cfg.eval_input, "preference"), esrc)
        stats["eval_file"] = estats
    else:
        train_recs, eval_recs = split_heldout(records, cfg.eval_fraction, cfg.split_by, tr.seed)
    rows, train_recs, dropped = tokenize_pairs(train_recs, tok, cfg.max_length, cfg.use_margin, src)
    _, eval_recs, edropped = tokenize_pairs(eval_recs, tok, cfg.max_length, False, esrc)
    stats.update({"dropped_overlong": dropped, "eval_dropped_overlong": edropped, "train_pairs": len(rows),
                  "eval_pairs": len(eval_recs), "uses_margin": bool(rows and "margin" in rows[0])})
    if not rows:
        raise BadInput(f"{src}: no training pair fits max_length={cfg.max_length} ({json.dumps(stats)})")
    for k in ("skipped_identical", "duplicate_ids", "dropped_overlong"):
        if stats[k]:
            log.warning("reward %s: %d pairs %s", src, stats[k], k.replace("_", " "))
    if is_main_process():
        ctx.write_json("data_stats.json", stats)
    trainer = build_reward_trainer(cfg, tr.model_path, tok, rows, ctx.out_dir, tr.seed, tr.dtype, tr.attn,
                                   callbacks=tr.callbacks, run_name=ctx.run_name)
    result = trainer.train(resume_from_checkpoint=tr.resume)
    # A LoRA adapter (which carries the trained score head) is merged into a fresh float copy.
    summary = finish(tr, trainer, result, load_base=lambda: load_reward_model(
        tr.model_path, "float32" if tr.dtype == "auto" else tr.dtype, "sdpa", tok.pad_token_id, tr.seed))
    del trainer
    gc.collect()  # free the training copy before the scorer loads the saved one
    report: dict = {}
    if is_main_process():
        report = _evaluate_saved(cfg, ctx, train_recs, eval_recs)
    barrier()
    heldout = report.get("heldout") or {}
    return {**summary, "data": stats, "heldout_accuracy": heldout.get("accuracy"),
            "heldout_mean_margin": heldout.get("mean_margin")}


def _evaluate_saved(cfg: RewardStageConfig, ctx: Any, train_recs: list[dict], eval_recs: list[dict]) -> dict:
    """Score held-out and a training sample with the saved folder (the scorer path); write eval files."""
    from reward.scorer import RewardScorer

    report: dict = {"model": str(ctx.out_dir), "heldout": None, "train_sample": None}
    sample = train_recs[: cfg.train_eval_limit]
    if not eval_recs and not sample:
        ctx.write_json("eval.json", report)
        return report
    with RewardScorer(str(ctx.out_dir), device="auto", dtype=ctx.recipe.file.model.dtype,
                      batch_size=cfg.eval_batch_size, max_length=cfg.max_length) as scorer:
        if eval_recs:
            report["heldout"], per_pair = evaluate_records(scorer, eval_recs, cfg.breakdown)
            with open(ctx.out_dir / "eval_scores.jsonl", "w", encoding="utf-8") as f:
                for p in per_pair:
                    f.write(json.dumps(p, ensure_ascii=False) + "\n")
            h = report["heldout"]
            log.info("reward: held-out accuracy %.3f, mean margin %.3f over %d pairs",
                     h["accuracy"], h["mean_margin"], h["n"])
        if sample:
            report["train_sample"], _ = evaluate_records(scorer, sample, cfg.breakdown)
    ctx.write_json("eval.json", report)
    return report
