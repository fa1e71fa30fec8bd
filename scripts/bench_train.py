"""Training benchmarks for the sft / dpo stages (CPU-friendly; results go to BENCHMARKS.md).

    .venv/bin/python scripts/bench_train.py [--only packing,dpo,memory] [--steps 12] [--mem-tokens 8192]

1. packing: on a mixed-length conversational set (16..1024 tokens per row), token efficiency (real
   tokens / token positions over every batch of an epoch) and real tokens trained per second, our
   packed padding-free SFT vs TRL's SFTTrainer with its default settings (padding), same tiny model,
   one after the other in the same process.
2. dpo: mean DPO step time with precomputed reference log-probs vs a live reference model (and the
   one-off precompute time), same run.
3. memory: peak resident memory of one SFT forward+backward at ``--mem-tokens`` tokens with a
   151,936-entry vocabulary (Qwen2's) and hidden size 128: TRL's chunked LM-head loss (our default)
   vs a naive full-logits cross-entropy. Each variant runs in a fresh subprocess (ru_maxrss).
Prints one JSON object per benchmark and a Markdown summary.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ("alpha beta gamma delta number river stone light paper water green table garden window music "
         "seven eleven forty answer question simple careful quick brown").split()


def mixed_conversations(tok, n: int, lo: int = 16, hi: int = 1024, seed: int = 0) -> list[list[dict]]:
    """``n`` user/assistant conversations whose templated length is spread uniformly over [lo, hi] tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        target = rng.randint(lo, hi)
        q_words = max(1, int(target * 0.3 / 1.5))
        a_words = max(1, int(target * 0.7 / 1.5))
        msgs = [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(q_words))},
                {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(a_words))}]
        # trim the reply until the templated conversation fits the target length
        while len(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]) > target:
            words = msgs[1]["content"].split()
            if len(words) <= 1:
                break
            msgs[1]["content"] = " ".join(words[: max(1, int(len(words) * 0.9))])
        out.append(msgs)
    return out


class CountingCollator:
    """Wraps a collator; records (real tokens, token positions) of every batch it builds."""

    def __init__(self, inner):
        self.inner = inner
        self.seen: list[tuple[int, int]] = []

    def __call__(self, examples):
        b = self.inner(examples)
        n = b["input_ids"].numel()
        real = int(b["attention_mask"].sum()) if "attention_mask" in b else n
        self.seen.append((real, n))
        return b


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t: list[float] = []
            self.t0 = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.t.append(time.perf_counter() - self.t0)

    return StepTimer()


def _efficiency(trainer) -> tuple[float, int]:
    """Real tokens / positions over one epoch of the trainer's dataloader."""
    c = CountingCollator(trainer.data_collator)
    trainer.data_collator = c
    for _ in trainer.get_train_dataloader():
        pass
    trainer.data_collator = c.inner
    real, pos = sum(r for r, _ in c.seen), sum(p for _, p in c.seen)
    return real / pos, len(c.seen)


def _timed_steps(trainer, steps: int, skip: int = 2) -> list[tuple[int, int, float]]:
    """Train ``steps`` steps from scratch; (real tokens, positions, seconds) of each step after ``skip``."""
    c = CountingCollator(trainer.data_collator)
    trainer.data_collator = c
    timer = _step_timer()
    trainer.add_callback(timer)
    trainer.args.max_steps = steps
    trainer.train()
    trainer.remove_callback(timer)
    trainer.data_collator = c.inner
    return [(r, p, t) for (r, p), t in zip(c.seen[skip:steps], timer.t[skip:])]


def _summary(rows: list[tuple[int, int, float]]) -> dict:
    real, pos, dt = (sum(x[i] for x in rows) for i in range(3))
    return {"tokens_per_s": real / dt, "step_s": dt / len(rows), "real_tokens_per_step": real / len(rows),
            "positions_per_step": pos / len(rows), "timed_steps": len(rows)}


def bench_packing(model_dir: Path, work: Path, steps: int, n_rows: int, rounds: int = 2) -> dict:
    """Our packed padding-free SFT vs TRL SFTTrainer defaults (padding) on mixed-length rows."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from posttrain.core.chat import training_template
    from posttrain.core.trainkit import TrainArgs
    from posttrain.trainers.sft import SFTStageConfig, build_sft_trainer, prepare_rows

    tok = AutoTokenizer.from_pretrained(model_dir)
    convs = mixed_conversations(tok, n_rows)
    lens = [len(tok.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"]) for m in convs]
    res = {"rows": n_rows, "row_tokens_min": min(lens), "row_tokens_max": max(lens),
           "row_tokens_mean": sum(lens) / len(lens)}

    # ours: packed into 4096-token bins, 2 bins per step, padding-free (one flat row per step)
    recs = [{"messages": m} for m in convs]
    rows, _ = prepare_rows(recs, tok, training_template(tok), 4096, "drop", True, "bench")
    cfg = SFTStageConfig(input="bench", max_length=4096, train=TrainArgs(per_device_train_batch_size=2, max_steps=steps,
                                                                           learning_rate=1e-4, min_learning_rate=1e-5))
    ours = build_sft_trainer(cfg, str(model_dir), tok, rows, None, work / "ours", seed=0)
    res["ours_efficiency"], res["ours_batches_per_epoch"] = _efficiency(ours)

    # TRL defaults: padding to the longest row of each batch of 8 (only bf16 / checkpointing off for CPU)
    trl_args = SFTConfig(output_dir=str(work / "trl"), bf16=False, gradient_checkpointing=False, use_cpu=True,
                         report_to="none", max_steps=steps, disable_tqdm=True, save_strategy="no")
    trl = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=trl_args,
                     train_dataset=Dataset.from_list(recs), processing_class=tok)
    res["trl_efficiency"], res["trl_batches_per_epoch"] = _efficiency(trl)
    res["trl_config"] = {"per_device_train_batch_size": trl_args.per_device_train_batch_size,
                         "max_length": trl_args.max_length, "packing": trl_args.packing,
                         "padding_free": trl_args.padding_free}

    # alternate the two trainers in rounds so that load from other processes hits both alike
    timed: dict[str, list] = {"ours": [], "trl": []}
    for _ in range(rounds):
        timed["ours"] += _timed_steps(ours, steps)
        timed["trl"] += _timed_steps(trl, steps)
    res["ours"], res["trl"] = _summary(timed["ours"]), _summary(timed["trl"])
    res["speedup_tokens_per_s"] = res["ours"]["tokens_per_s"] / res["trl"]["tokens_per_s"]
    return res


def bench_dpo(model_dir: Path, work: Path, steps: int, rounds: int = 2) -> dict:
    """DPO step time: precomputed reference log-probs vs a live reference model."""
    from transformers import AutoTokenizer

    from posttrain.trainers.dpo import DPOStageConfig, DPOTrainArgs, build_dpo_trainer
    from tests.test_dpo import make_prefs

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in make_prefs(8 * steps)]
    out, trainers, times = {}, {}, {"live": [], "precomputed": []}
    for pre in (False, True):
        cfg = DPOStageConfig(input="bench", precompute_ref_log_probs=pre, max_length=256,
                             train=DPOTrainArgs(per_device_train_batch_size=8, max_steps=steps, learning_rate=1e-4))
        t0 = time.perf_counter()
        key = "precomputed" if pre else "live"
        trainers[key] = build_dpo_trainer(cfg, str(model_dir), tok, rows, None, work / f"dpo{int(pre)}", seed=0)
        out[key] = {"trainer_build_s": time.perf_counter() - t0}  # includes the one-off precompute pass
    for _ in range(rounds):  # alternate so that outside load hits both alike
        for key, tr in trainers.items():
            timer = _step_timer()
            tr.add_callback(timer)
            tr.train()
            tr.remove_callback(timer)
            times[key] += timer.t[2:]
    for key in trainers:
        out[key]["step_s"] = sum(times[key]) / len(times[key])
        out[key]["timed_steps"] = len(times[key])
    out["live_over_precomputed"] = out["live"]["step_s"] / out["precomputed"]["step_s"]
    return out


def _mem_child(mode: str, tokens: int, model_dir: str) -> None:
    """Subprocess body: RSS growth of one forward+backward at ``tokens`` tokens."""
    import torch
    from transformers import AutoTokenizer

    from posttrain.core.trainkit import TrainArgs
    from posttrain.trainers.sft import SFTStageConfig, build_sft_trainer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    vocab = 151936
    ids = torch.randint(0, vocab, (tokens,)).tolist()
    rows = [{"input_ids": ids, "labels": ids}]
    cfg = SFTStageConfig(input="bench", max_length=tokens, loss=mode, train=TrainArgs(max_steps=1))
    tr = build_sft_trainer(cfg, model_dir, tok, rows, None, Path(tempfile.mkdtemp()), seed=0)
    batch = next(iter(tr.get_train_dataloader()))
    n = batch["labels"][:, 1:].ne(-100).sum()
    model = tr.model.train()
    before = _rss_kib()
    t0 = time.perf_counter()
    loss = tr.compute_loss(model, batch, num_items_in_batch=n)
    loss.backward()
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"mode": mode, "tokens": tokens, "vocab": vocab, "loss": float(loss),
                      "rss_before_mib": before / 1024, "peak_rss_mib": peak / 1024,
                      "step_peak_growth_mib": (peak - before) / 1024, "fwd_bwd_s": dt}))


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def bench_memory(work: Path, tokens: int) -> dict:
    """Chunked (TRL fused LM head) vs naive full-logits loss: peak RSS of one step, fresh process each."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from posttrain.core.tiny import make_tiny_model

    small = make_tiny_model(work / "tok", reward=False)
    d = work / "vocab152k"
    cfg = Qwen2Config(vocab_size=151936, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=32768, pad_token_id=0)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(d)
    AutoTokenizer.from_pretrained(small).save_pretrained(d)
    out = {}
    for mode in ("chunked", "naive"):
        p = subprocess.run([sys.executable, __file__, "--mem-child", mode, str(tokens), str(d)],
                           capture_output=True, text=True, cwd=ROOT)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        if p.returncode != 0 or not lines:
            out[mode] = {"error": (p.stderr or p.stdout)[-2000:]}
        else:
            out[mode] = json.loads(lines[-1])
    if "error" not in out["chunked"] and "error" not in out["naive"]:
        out["naive_over_chunked_growth"] = out["naive"]["step_peak_growth_mib"] / out["chunked"]["step_peak_growth_mib"]
        out["loss_abs_diff"] = abs(out["naive"]["loss"] - out["chunked"]["loss"])
    return out


def main() -> None:
    """Run the selected benchmarks and print JSON + Markdown."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="packing,dpo,memory")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of --steps steps per trainer")
    ap.add_argument("--mem-tokens", type=int, default=8192)
    ap.add_argument("--mem-child", nargs=3, metavar=("MODE", "TOKENS", "MODEL"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.mem_child:
        _mem_child(a.mem_child[0], int(a.mem_child[1]), a.mem_child[2])
        return
    import torch

    from posttrain.core.tiny import make_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    model_dir = make_tiny_model(work / "tiny", reward=False)
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpus": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.cuda.is_available(), "loadavg_start": os.getloadavg()[0]}
    results = {"machine": info}
    which = a.only.split(",")
    if "packing" in which:
        results["packing"] = bench_packing(model_dir, work, a.steps, a.rows, a.rounds)
        print(json.dumps({"packing": results["packing"]}), flush=True)
    if "dpo" in which:
        results["dpo"] = bench_dpo(model_dir, work, a.steps, a.rounds)
        print(json.dumps({"dpo": results["dpo"]}), flush=True)
    if "memory" in which:
        results["memory"] = bench_memory(work, a.mem_tokens)
        print(json.dumps({"memory": results["memory"]}), flush=True)
    info["loadavg_end"] = os.getloadavg()[0]
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
