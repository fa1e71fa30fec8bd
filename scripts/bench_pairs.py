"""DPO and reward-model training throughput on mixed-length pairs: TRL's padded trainers vs our packed path.

    .venv/bin/python scripts/bench_pairs.py [--tasks dpo,reward] [--models tiny,medium] [--batch 4]
        [--steps 6] [--repeats 2] [--lo 20] [--hi 1000] [--variants padded,packed[,padded_grouped]]

For each (task, model) the variants run round-robin, ``--repeats`` times, each in a fresh
subprocess (so ``ru_maxrss`` is that run's own peak), on the same generated pairs in the same
order (same seed): every sequence (prompt + reply, chat template included) has a length drawn
uniformly from [--lo, --hi] tokens, chosen and rejected drawn independently.

* ``padded``: TRL 1.16's own ``DPOTrainer`` / ``RewardTrainer`` (not our subclasses), with its best
  CPU settings: fp32 (``bf16=False``: no bf16 units), ``gradient_checkpointing=False``, sdpa attention,
  ``pad_to_multiple_of=None``, random batches; DPO with ``padding_free=False`` (TRL 1.16 forces it),
  ``loss_type=[sigmoid]``, live reference model (a frozen copy, TRL's default); the reward model with
  ``disable_dropout=True``.
* ``padded_grouped`` (optional): the same, plus HF's length-grouped sampler
  (``train_sampling_strategy=group_by_length``; the bench adds the length column TRL's datasets lack).
  It changes which pairs share a batch, so it is a different training recipe, listed for reference.
* ``packed``: ``build_dpo_trainer`` / ``build_reward_trainer`` with ``packing: true`` and the same
  TRL config (sdpa run per packed document, ``sdpa_varlen``).

Measured per run: pairs actually trained per second over the optimizer steps after the first
(``--steps`` steps of ``--batch`` pairs; the first is warm-up), real tokens and token positions per
step, peak resident memory of the process and its growth over the resident memory just before
``train()`` (model, reference, data already loaded). Prints one JSON line per run, then a Markdown
table with medians and packed / padded ratios from the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import WORDS, fit_messages, machine, model_dir, rss_mib, step_timer


# ---------------------------------------------------------------- data

def mixed_pairs(tok, n: int, lo: int, hi: int, seed: int = 0) -> list[dict]:
    """``n`` preference rows; each side's templated length is drawn uniformly from [lo, hi] tokens."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tc, tr = rng.randint(lo, hi), rng.randint(lo, hi)
        plen = rng.randint(4, max(4, min(tc, tr) // 3))
        prompt = fit_messages(tok, [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(plen))}],
                              max(8, min(tc, tr) // 3))
        sides = []
        for t in (tc, tr):
            reply = {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(t))}
            sides.append(fit_messages(tok, prompt + [reply], t)[-1:])
        rows.append({"prompt": prompt, "chosen": sides[0], "rejected": sides[1]})
    return rows


# ---------------------------------------------------------------- one run (child process)

class _Counter:
    """Wraps a collator; records (pairs, real tokens, token positions) of every micro-batch."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def __call__(self, examples):
        b = self.inner(examples)
        pos = b["input_ids"].numel()
        real = int(b["attention_mask"].sum()) if "attention_mask" in b else pos
        self.seen.append((len(examples), real, pos))
        return b


def _add_lengths(trainer, task: str) -> None:
    """Give TRL's tokenized dataset the ``length`` column HF's length-grouped sampler reads."""
    if task == "dpo":
        ds = trainer.train_dataset.map(lambda e: {"length": len(e["prompt_ids"]) +
                                                  max(len(e["chosen_ids"]), len(e["rejected_ids"]))})
    else:
        ds = trainer.train_dataset.map(lambda e: {"length": max(len(e["chosen_ids"]), len(e["rejected_ids"]))})
    trainer.train_dataset = ds
    trainer._set_signature_columns_if_needed()
    trainer._signature_columns = list(trainer._signature_columns) + ["length"]


def child(a: argparse.Namespace) -> dict:
    """Train ``a.steps`` steps with one variant and report throughput and memory (runs in its own process)."""
    import torch
    from transformers import AutoTokenizer

    from posttrain.core.attention import pick_attention
    from posttrain.core.config import build
    from posttrain.core.trainkit import TrainArgs, load_causal_lm, trl_args

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model)
    rows = json.loads(Path(a.data).read_text())
    out = Path(tempfile.mkdtemp(prefix="bench_pairs_"))
    packed = a.variant == "packed"
    attn = pick_attention(None, "sdpa", packed=packed)  # sdpa_varlen when packed, plain sdpa otherwise
    t = TrainArgs(per_device_train_batch_size=a.batch, max_steps=a.steps, report_to=[], bf16=False,
                  gradient_checkpointing=False, logging_steps=10 ** 6, learning_rate=1e-6, min_learning_rate=1e-7,
                  seed=0)
    extra = {"train_sampling_strategy": "group_by_length"} if a.variant == "padded_grouped" else {}
    if a.task == "dpo":
        from trl import DPOConfig, DPOTrainer

        from posttrain.core.trainkit import dataset_on_disk
        from posttrain.trainers.dpo import DPOStageConfig, build_dpo_trainer

        if packed:
            cfg = build(DPOStageConfig, {"input": "x", "packing": True, "max_length": None,
                                         "train": {"per_device_train_batch_size": a.batch, "max_steps": a.steps,
                                                   "report_to": [], "bf16": False, "gradient_checkpointing": False,
                                                   "logging_steps": 10 ** 6, "seed": 0}})
            trainer = build_dpo_trainer(cfg, a.model, tok, rows, None, out, 0, "float32", attn)
        else:
            args = trl_args(DPOConfig, t, out, 0, beta=0.1, loss_type=["sigmoid"], max_length=None,
                            padding_free=False, eval_strategy="no", **extra)
            trainer = DPOTrainer(model=load_causal_lm(a.model, "float32", attn), args=args,
                                 train_dataset=dataset_on_disk(rows, out / "_data"), processing_class=tok)
    else:
        from trl import RewardConfig, RewardTrainer

        from posttrain.core.trainkit import dataset_on_disk
        from reward.train import (
            RewardStageConfig,
            build_reward_trainer,
            load_reward_model,
            tokenize_pairs,
        )

        recs = [dict(r, id=str(i)) for i, r in enumerate(rows)]
        pairs, _, _ = tokenize_pairs(recs, tok, 10 ** 6, False, "bench")
        if packed:
            cfg = build(RewardStageConfig, {"input": "x", "packing": True, "max_length": 10 ** 6,
                                            "train": {"per_device_train_batch_size": a.batch, "max_steps": a.steps,
                                                      "report_to": [], "bf16": False,
                                                      "gradient_checkpointing": False, "logging_steps": 10 ** 6,
                                                      "seed": 0}})
            trainer = build_reward_trainer(cfg, str(Path(a.model) / "reward"), tok, pairs, out, 0, "float32", attn)
        else:
            args = trl_args(RewardConfig, t, out, 0, max_length=None, dataset_num_proc=None, eval_strategy="no",
                            disable_dropout=True, **extra)
            model = load_reward_model(str(Path(a.model) / "reward"), "float32", attn, tok.pad_token_id, 0)
            trainer = RewardTrainer(model=model, args=args, train_dataset=dataset_on_disk(pairs, out / "_data"),
                                    processing_class=tok)
    if a.variant == "padded_grouped":
        _add_lengths(trainer, a.task)
    counter = _Counter(trainer.data_collator)
    trainer.data_collator = counter
    timer = step_timer()
    trainer.add_callback(timer)
    base = rss_mib()
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    steps = counter.seen[: a.steps]
    timed = steps[1:]
    secs = sum(timer.t[1:])
    pairs = sum(p for p, _, _ in timed)
    return {"task": a.task, "model": a.model_name, "variant": a.variant, "attn": attn, "batch": a.batch,
            "steps": len(timer.t), "timed_steps": len(timed), "pairs_trained": sum(p for p, _, _ in steps),
            "timed_pairs": pairs, "seconds": secs, "pairs_per_s": pairs / secs,
            "real_tokens_per_step": statistics.mean(r for _, r, _ in timed),
            "positions_per_step": statistics.mean(p for _, _, p in timed),
            "params_m": sum(p.numel() for p in trainer.model.parameters()) / 1e6,
            "rss_before_train_mb": base, "peak_rss_mb": peak, "train_growth_mb": peak - base}


# ---------------------------------------------------------------- driver

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="dpo,reward")
    ap.add_argument("--models", default="tiny,medium")
    ap.add_argument("--variants", default="padded,packed")
    ap.add_argument("--batch", type=int, default=4, help="pairs per step (per_device_train_batch_size)")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is not timed)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--lo", type=int, default=20)
    ap.add_argument("--hi", type=int, default=1000)
    ap.add_argument("--work", default=None, help="folder for models and data (default: a temp folder)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--task", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--model-name", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a)), flush=True)
        return

    from transformers import AutoTokenizer

    work = Path(a.work or tempfile.mkdtemp(prefix="bench_pairs_"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M")
    load = os.getloadavg()
    results = []
    for model_name in a.models.split(","):
        mdir = model_dir(work, model_name)
        tok = AutoTokenizer.from_pretrained(mdir)
        data = work / f"pairs_{a.lo}_{a.hi}.json"
        if not data.exists():
            data.write_text(json.dumps(mixed_pairs(tok, a.batch * a.steps, a.lo, a.hi)))
        for task in a.tasks.split(","):
            for rep in range(a.repeats):
                for variant in a.variants.split(","):
                    cmd = [sys.executable, __file__, "--child", "--task", task, "--variant", variant, "--model",
                           str(mdir), "--model-name", model_name, "--data", str(data), "--batch", str(a.batch),
                           "--steps", str(a.steps)]
                    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
                    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
                    if p.returncode or not line:
                        sys.exit(f"{task}/{model_name}/{variant} failed:\n{p.stderr[-3000:]}")
                    r = json.loads(line[0][7:]) | {"repeat": rep}
                    print(json.dumps(r), flush=True)
                    results.append(r)
    _table(results, a, started, load)


def _table(results: list[dict], a: argparse.Namespace, started: str, load: tuple) -> None:
    print(f"\nCommand: `.venv/bin/python scripts/bench_pairs.py --tasks {a.tasks} --models {a.models} "
          f"--variants {a.variants} --batch {a.batch} --steps {a.steps} --repeats {a.repeats} --lo {a.lo} "
          f"--hi {a.hi}`  ")
    print(f"Date: {started}. Machine: {machine()}; load average at start {load[0]:.1f}, {load[1]:.1f}, "
          f"{load[2]:.1f}.\n")
    print("| task | model (params) | variant | attention | pairs/s (median) | vs padded | positions/step | "
          "real tokens/step | peak RSS MiB | growth in train() MiB |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    keys = sorted({(r["task"], r["model"]) for r in results}, key=lambda k: (k[0], k[1]))
    for task, model in keys:
        group = [r for r in results if r["task"] == task and r["model"] == model]
        med = {v: statistics.median(r["pairs_per_s"] for r in group if r["variant"] == v)
               for v in dict.fromkeys(r["variant"] for r in group)}
        for v, pps in med.items():
            rs = [r for r in group if r["variant"] == v]
            print(f"| {task} | {model} ({rs[0]['params_m']:.1f}M) | {v} | {rs[0]['attn']} | {pps:.2f} | "
                  f"{pps / med['padded']:.2f}x | {statistics.mean(r['positions_per_step'] for r in rs):.0f} | "
                  f"{statistics.mean(r['real_tokens_per_step'] for r in rs):.0f} | "
                  f"{max(r['peak_rss_mb'] for r in rs):.0f} | {max(r['train_growth_mb'] for r in rs):.0f} |")
    print("\nPer-run pairs/s (repeats in order):")
    for task, model in keys:
        for v in dict.fromkeys(r["variant"] for r in results):
            xs = [f"{r['pairs_per_s']:.2f}" for r in results if (r["task"], r["model"], r["variant"]) ==
                  (task, model, v)]
            print(f"- {task} {model} {v}: {', '.join(xs)}")


if __name__ == "__main__":
    main()
