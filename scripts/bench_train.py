"""Training benchmarks for the sft / dpo stages (CPU-friendly; results go to BENCHMARKS.md).

    .venv/bin/python scripts/bench_train.py [--only sft,dpo,memory] [--models tiny,medium] [--steps 8]
        [--rounds 3] [--variants ours,trl_best_varlen,trl_best[,trl_default]] [--mem-tokens 8192,32768]

1. sft: tokens per second of SFT on mixed-length conversations (templated length uniform in
   [--lo, --hi] tokens), counted two ways: input tokens (every token the model reads) and trained
   tokens (tokens that carry loss: here the assistant replies and their end-of-turn token). Variants,
   all on the same conversations, the same model, same optimizer (AdamW, lr 1e-4), fp32, no gradient
   checkpointing, ``--bin`` tokens per packed row and ``--batch`` rows per step:

   * ``ours``: the sft stage's trainer (``build_sft_trainer``): rows tokenized by
     ``posttrain.core.chat`` with assistant-only labels, best-fit-decreasing packing, padding-free,
     attention per packed document (``sdpa_varlen``, ``posttrain.core.attention``).
   * ``trl_best_varlen``: TRL's own ``SFTTrainer`` in its best CPU configuration (``packing=True``,
     ``packing_strategy="bfd"``, ``padding_free=True``, ``assistant_only_loss=True`` from the chat
     template's generation markers, conversational ``messages`` rows), model loaded with our
     ``sdpa_varlen`` attention (registered with transformers' attention interface by this script).
   * ``trl_best``: the same TRL configuration with transformers' default attention (sdpa). A padding-free
     batch is then attended under a block-diagonal mask built from ``position_ids``, at a cost of
     (tokens per micro-batch)^2, so TRL's best here is ``max_length`` 1024 (TRL's default, the smallest
     bin that holds every row; ``--own-bin``) with one bin per micro-batch and gradient accumulation to
     the same tokens per optimizer step as ours.
   * ``trl_default`` (optional): ``SFTConfig()`` defaults (no packing: batches of 8 padded to the
     longest row, ``max_length`` 1024, loss on every token), only bf16 / gradient checkpointing off.

   The variants run alternately (``--rounds`` rounds of ``--steps`` steps each, the first ``--skip``
   steps of every round not timed) so that load from other processes hits them alike.
2. dpo: mean DPO step time with precomputed reference log-probs vs a live reference model (and the
   one-off precompute time), same run.
3. memory: peak resident memory of one SFT forward+backward at each of ``--mem-tokens`` tokens with a
   151,936-entry vocabulary (Qwen2's) and hidden size 128: TRL's chunked LM-head loss (our default)
   vs a naive full-logits cross-entropy. Each variant runs in a fresh subprocess (ru_maxrss). A
   variant whose estimated need exceeds the memory available now is not run (its estimate is printed),
   and a child is stopped when the machine's available memory runs low (the machine may be shared).
Prints one JSON object per benchmark and Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import MODELS, ROOT, machine, mixed_conversations, model_dir, rss_mib, step_timer

VOCAB = 151936  # Qwen2's vocabulary
SFT_VARIANTS = ("ours", "trl_best_varlen", "trl_best", "trl_default")
LOSS_ON = {"ours": "assistant tokens (labels from posttrain.core.chat, template generation markers)",
           "trl_best_varlen": "assistant tokens (TRL assistant_only_loss: template generation markers)",
           "trl_best": "assistant tokens (TRL assistant_only_loss: template generation markers)",
           "trl_default": "every token, prompt included (TRL default)"}


class CountingCollator:
    """Wraps a collator; records (input tokens, trained tokens, token positions) of every batch it builds.

    Input tokens are the real (non-padding) tokens; trained tokens are the labels after the shift
    that are not -100 (the tokens whose prediction is in the loss).
    """

    def __init__(self, inner):
        self.inner = inner
        self.seen: list[tuple[int, int, int]] = []

    def __call__(self, examples):
        b = self.inner(examples)
        n = b["input_ids"].numel()
        real = int(b["attention_mask"].sum()) if "attention_mask" in b else n
        trained = int(b["labels"][:, 1:].ne(-100).sum())
        self.seen.append((real, trained, n))
        return b


def _epoch_counts(trainer) -> dict:
    """Input tokens, trained tokens and positions over one epoch of the trainer's dataloader."""
    c = CountingCollator(trainer.data_collator)
    trainer.data_collator = c
    for _ in trainer.get_train_dataloader():
        pass
    trainer.data_collator = c.inner
    real, trained, pos = (sum(x[i] for x in c.seen) for i in range(3))
    return {"batches": len(c.seen), "input_tokens": real, "trained_tokens": trained, "positions": pos,
            "input_over_positions": real / pos, "trained_over_input": trained / real}


def _timed_steps(trainer, steps: int, skip: int) -> list[tuple[int, int, int, float]]:
    """Train ``steps`` steps; (input tokens, trained tokens, positions, seconds) of each step after ``skip``."""
    c = CountingCollator(trainer.data_collator)
    trainer.data_collator = c
    timer = step_timer()
    trainer.add_callback(timer)
    trainer.args.max_steps = steps
    trainer.train()
    trainer.remove_callback(timer)
    trainer.data_collator = c.inner
    ga = trainer.args.gradient_accumulation_steps  # micro-batches per optimizer step
    per_step = [tuple(sum(b[i] for b in c.seen[k * ga:(k + 1) * ga]) for i in range(3)) for k in range(steps)]
    return [(*x, t) for x, t in zip(per_step[skip:], timer.t[skip:])]


def _summary(rows: list[tuple[int, int, int, float]]) -> dict:
    real, trained, pos, dt = (sum(x[i] for x in rows) for i in range(4))
    n = len(rows)
    return {"input_tokens_per_s": real / dt, "trained_tokens_per_s": trained / dt, "step_s": dt / n,
            "input_tokens_per_step": real / n, "trained_tokens_per_step": trained / n, "positions_per_step": pos / n,
            "timed_steps": n}


def _trl_settings(trainer) -> dict:
    """The settings that decide an SFT trainer's speed, read back from the built trainer."""
    a = trainer.args
    return {"packing": a.packing, "packing_strategy": a.packing_strategy if a.packing else None,
            "padding_free": bool(getattr(trainer, "padding_free", a.padding_free)),
            "assistant_only_loss": a.assistant_only_loss, "completion_only_loss": a.completion_only_loss,
            "max_length": a.max_length, "per_device_train_batch_size": a.per_device_train_batch_size,
            "gradient_accumulation_steps": a.gradient_accumulation_steps,
            "pad_to_multiple_of": a.pad_to_multiple_of, "loss_type": a.loss_type, "bf16": a.bf16,
            "gradient_checkpointing": a.gradient_checkpointing, "optim": a.optim, "learning_rate": a.learning_rate,
            "attn_implementation": trainer.model.config._attn_implementation}


def build_sft_variant(variant: str, mdir: Path, tok, convs: list, work: Path, bin_tokens: int, batch: int,
                      steps: int, own_bin: int = 1024):
    """One SFT trainer of ``SFT_VARIANTS`` on the conversations ``convs``."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from posttrain.core.attention import register_sdpa_varlen
    from posttrain.core.chat import training_template
    from posttrain.core.trainkit import TrainArgs
    from posttrain.trainers.sft import SFTStageConfig, build_sft_trainer, prepare_rows

    recs = [{"messages": m} for m in convs]
    t = TrainArgs(per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-4, min_learning_rate=1e-5,
                  logging_steps=10 ** 6, bf16=False, gradient_checkpointing=False)
    if variant == "ours":
        rows, _ = prepare_rows(recs, tok, training_template(tok), bin_tokens, "drop", True, "bench")
        cfg = SFTStageConfig(input="bench", max_length=bin_tokens, train=t)
        tr = build_sft_trainer(cfg, str(mdir), tok, rows, None, work / variant, seed=0)
        tr.args.disable_tqdm = True
        return tr
    common = dict(output_dir=str(work / variant), bf16=False, gradient_checkpointing=False, use_cpu=True,
                  report_to="none", max_steps=steps, disable_tqdm=True, save_strategy="no", logging_steps=10 ** 6,
                  learning_rate=t.learning_rate, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
                  adam_beta2=t.adam_beta2, max_grad_norm=t.max_grad_norm, optim=t.optim, seed=0, data_seed=0)
    if variant == "trl_default":
        args = SFTConfig(**common)
        model = AutoModelForCausalLM.from_pretrained(mdir)
    elif variant == "trl_best_varlen":  # the same bins and batch as ours
        args = SFTConfig(**common, packing=True, packing_strategy="bfd", padding_free=True, assistant_only_loss=True,
                         max_length=bin_tokens, per_device_train_batch_size=batch)
        model = AutoModelForCausalLM.from_pretrained(mdir, attn_implementation=register_sdpa_varlen())
    else:
        # TRL's own (sdpa) attention over a padding-free batch costs (tokens in the micro-batch)^2 under a
        # block-diagonal mask, so its best is the smallest bin that holds every row (TRL's default max_length,
        # 1024 >= --hi) with one bin per micro-batch, accumulated to the same tokens per optimizer step.
        args = SFTConfig(**common, packing=True, packing_strategy="bfd", padding_free=True, assistant_only_loss=True,
                         max_length=own_bin, per_device_train_batch_size=1,
                         gradient_accumulation_steps=max(1, bin_tokens * batch // own_bin))
        model = AutoModelForCausalLM.from_pretrained(mdir)
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(recs), processing_class=tok)


def bench_sft(work: Path, model_name: str, variants: list[str], steps: int, rounds: int, skip: int, n_rows: int,
              lo: int, hi: int, bin_tokens: int, batch: int, own_bin: int = 1024) -> dict:
    """Input and trained tokens/s of the SFT variants on one model size, alternating in rounds."""
    from transformers import AutoTokenizer

    mdir = model_dir(work, model_name, reward=False)
    tok = AutoTokenizer.from_pretrained(mdir)
    convs = mixed_conversations(tok, n_rows, lo, hi)
    lens = [len(tok.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"]) for m in convs]
    res: dict = {"model": model_name, "rows": n_rows, "row_tokens_min": min(lens), "row_tokens_max": max(lens),
                 "row_tokens_mean": sum(lens) / len(lens), "bin_tokens": bin_tokens, "batch": batch,
                 "steps_per_round": steps, "skip": skip, "rounds": rounds, "variants": {}}
    trainers = {}
    for v in variants:
        trainers[v] = build_sft_variant(v, mdir, tok, convs, work / model_name, bin_tokens, batch, steps, own_bin)
        res["variants"][v] = {"settings": _trl_settings(trainers[v]) | {"loss_on": LOSS_ON[v]},
                              "epoch": _epoch_counts(trainers[v])}
    res["params_m"] = sum(p.numel() for p in trainers[variants[0]].model.parameters()) / 1e6
    timed: dict[str, list] = {v: [] for v in variants}
    per_round: dict[str, list] = {v: [] for v in variants}
    for _ in range(rounds):  # alternate the trainers so that outside load hits all alike
        for v in variants:
            rows = _timed_steps(trainers[v], steps, skip)
            timed[v] += rows
            per_round[v].append(_summary(rows)["trained_tokens_per_s"])
    for v in variants:
        res["variants"][v].update(_summary(timed[v]), trained_tokens_per_s_rounds=per_round[v])
    for v in variants:
        r = res["variants"][v]
        for anchor in ("trl_best", "trl_best_varlen"):
            if anchor in variants:
                for k in ("input_tokens_per_s", "trained_tokens_per_s"):
                    r[f"{k}_vs_{anchor}"] = r[k] / res["variants"][anchor][k]
    return res


def bench_dpo(mdir: Path, work: Path, steps: int, rounds: int = 2) -> dict:
    """DPO step time: precomputed reference log-probs vs a live reference model."""
    from transformers import AutoTokenizer

    from posttrain.trainers.dpo import DPOStageConfig, DPOTrainArgs, build_dpo_trainer
    from tests.test_dpo import make_prefs

    tok = AutoTokenizer.from_pretrained(mdir)
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in make_prefs(8 * steps)]
    out, trainers, times = {}, {}, {"live": [], "precomputed": []}
    for pre in (False, True):
        cfg = DPOStageConfig(input="bench", precompute_ref_log_probs=pre, max_length=256,
                             train=DPOTrainArgs(per_device_train_batch_size=8, max_steps=steps, learning_rate=1e-4))
        t0 = time.perf_counter()
        key = "precomputed" if pre else "live"
        trainers[key] = build_dpo_trainer(cfg, str(mdir), tok, rows, None, work / f"dpo{int(pre)}", seed=0)
        out[key] = {"trainer_build_s": time.perf_counter() - t0}  # includes the one-off precompute pass
    for _ in range(rounds):  # alternate so that outside load hits both alike
        for key, tr in trainers.items():
            timer = step_timer()
            tr.add_callback(timer)
            tr.train()
            tr.remove_callback(timer)
            times[key] += timer.t[2:]
    for key in trainers:
        out[key]["step_s"] = sum(times[key]) / len(times[key])
        out[key]["timed_steps"] = len(times[key])
    out["live_over_precomputed"] = out["live"]["step_s"] / out["precomputed"]["step_s"]
    return out


def _mem_child(mode: str, tokens: int, mdir: str) -> None:
    """Subprocess body: RSS growth of one forward+backward at ``tokens`` tokens."""
    import torch
    from transformers import AutoTokenizer

    from posttrain.core.trainkit import TrainArgs
    from posttrain.trainers.sft import SFTStageConfig, build_sft_trainer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(mdir)
    ids = torch.randint(0, VOCAB, (tokens,)).tolist()
    rows = [{"input_ids": ids, "labels": ids}]
    cfg = SFTStageConfig(input="bench", max_length=tokens, loss=mode, train=TrainArgs(max_steps=1))
    tr = build_sft_trainer(cfg, mdir, tok, rows, None, Path(tempfile.mkdtemp()), seed=0)
    batch = next(iter(tr.get_train_dataloader()))
    n = batch["labels"][:, 1:].ne(-100).sum()
    model = tr.model.train()
    before = rss_mib()
    t0 = time.perf_counter()
    loss = tr.compute_loss(model, batch, num_items_in_batch=n)
    loss.backward()
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "tokens": tokens, "vocab": VOCAB, "loss": float(loss), "rss_before_mib": before,
                      "peak_rss_mib": peak, "step_peak_growth_mib": peak - before, "fwd_bwd_s": dt}))


def _available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


def _run_watched(cmd: list[str], floor_gib: float = 1.5) -> tuple[int, str, str, dict]:
    """Run ``cmd``; stop it when the machine's MemAvailable falls under ``floor_gib`` (the machine is shared:
    better to lose this measurement than to have the kernel's OOM killer pick another job's process)."""
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=ROOT)
    watch: dict = {"min_available_gib": _available_gib()}
    while p.poll() is None:
        avail = _available_gib()
        watch["min_available_gib"] = min(watch["min_available_gib"], avail)
        try:
            with open(f"/proc/{p.pid}/status") as f:
                hwm = [ln for ln in f if ln.startswith("VmHWM:")]
            if hwm:  # absent once the child has exited
                watch["child_peak_rss_mib"] = int(hwm[0].split()[1]) / 1024
        except OSError:
            pass
        if avail < floor_gib:
            p.kill()
            watch["stopped"] = f"MemAvailable fell under {floor_gib} GiB (machine shared with other jobs)"
        time.sleep(0.5)
    out.seek(0)
    err.seek(0)
    return p.returncode, out.read(), err.read(), watch


def logits_gib(tokens: int) -> float:
    """Size of the full fp32 ``tokens x 151,936`` logits in GiB."""
    return tokens * VOCAB * 4 / 2 ** 30


def bench_memory(work: Path, token_counts: list[int], margin_gib: float = 3.0) -> dict:
    """Chunked (TRL fused LM head) vs naive full-logits loss: peak RSS of one step, fresh process each.

    Before each run the need is estimated (naive: 3.2x the fp32 logits, the factor measured at 8K:
    logits, their log-softmax and a gradient of that size; chunked: 5 GiB, so it runs with 8 GiB free) and the run is skipped when
    MemAvailable is below need + ``margin_gib``; the result then holds the estimate instead.
    """
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from posttrain.core.tiny import make_tiny_model

    small = make_tiny_model(work / "tok", reward=False)
    d = work / "vocab152k"
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=max(token_counts), pad_token_id=0)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(d)
    AutoTokenizer.from_pretrained(small).save_pretrained(d)
    out: dict = {}
    for tokens in token_counts:
        res: dict = {"logits_gib": logits_gib(tokens)}
        for mode in ("chunked", "naive"):
            need = 3.2 * logits_gib(tokens) if mode == "naive" else 5.0
            avail = _available_gib()
            if avail < need + margin_gib:
                res[mode] = {"skipped": f"estimated need {need:.1f} GiB + {margin_gib:.0f} GiB margin > "
                                        f"{avail:.1f} GiB available", "estimated_growth_mib": need * 1024}
                continue
            rc, stdout, stderr, watch = _run_watched([sys.executable, __file__, "--mem-child", mode, str(tokens), str(d)])
            lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
            if rc != 0 or not lines:
                res[mode] = {"error": stderr[-2000:], "returncode": rc} | watch
            else:
                res[mode] = json.loads(lines[-1]) | {"available_gib_before": avail} | watch
        grown = {m: res[m].get("step_peak_growth_mib", res[m].get("estimated_growth_mib")) for m in ("chunked", "naive")}
        if None not in grown.values():
            res["naive_over_chunked_growth"] = grown["naive"] / grown["chunked"]
        if "loss" in res["chunked"] and "loss" in res["naive"]:
            res["loss_abs_diff"] = abs(res["naive"]["loss"] - res["chunked"]["loss"])
        out[str(tokens)] = res
    return out


# ---------------------------------------------------------------- report

def sft_table(r: dict) -> str:
    """Markdown rows of one model size's SFT result."""
    names = {"ours": "ours (sft stage: packed bfd, padding-free, assistant-only, sdpa_varlen)",
             "trl_best_varlen": "TRL SFTTrainer best + our sdpa_varlen",
             "trl_best": "TRL SFTTrainer best, its own attention",
             "trl_default": "TRL SFTTrainer defaults (reference only)"}
    lines = []
    for v, x in r["variants"].items():
        s = x["settings"]
        aol = "labels given (assistant-only)" if v == "ours" else f"assistant_only_loss={s['assistant_only_loss']}"
        trl = (f"packing={s['packing']}, packing_strategy={s['packing_strategy']!r}, padding_free={s['padding_free']}, "
               f"{aol}, max_length={s['max_length']}, per_device_train_batch_size={s['per_device_train_batch_size']}, "
               f"gradient_accumulation_steps={s['gradient_accumulation_steps']}, attn={s['attn_implementation']}")
        ratio = " / ".join(f"{x.get(f'{k}_vs_trl_best', float('nan')):.2f}x" for k in ("input_tokens_per_s",
                                                                                           "trained_tokens_per_s"))
        ratio_v = " / ".join(f"{x.get(f'{k}_vs_trl_best_varlen', float('nan')):.2f}x"
                             for k in ("input_tokens_per_s", "trained_tokens_per_s"))
        lines.append(f"| {r['model']} ({r['params_m']:.1f}M) | {names[v]} | {trl} | {x['input_tokens_per_step']:.0f} | "
                     f"{x['trained_tokens_per_step']:.0f} | {x['step_s']:.2f} | {x['input_tokens_per_s']:.0f} | "
                     f"{x['trained_tokens_per_s']:.0f} | {ratio} | {ratio_v} |")
    return "\n".join(lines)


def main() -> None:
    """Run the selected benchmarks and print JSON + Markdown."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="sft,dpo,memory", help="sft (alias: packing), dpo, memory")
    ap.add_argument("--models", default="tiny,medium", help=f"sft model sizes: {', '.join(MODELS)}")
    ap.add_argument("--variants", default="ours,trl_best_varlen,trl_best", help=", ".join(SFT_VARIANTS))
    ap.add_argument("--steps", type=int, default=8, help="steps per trainer per round")
    ap.add_argument("--skip", type=int, default=2, help="untimed warm-up steps at the start of every round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of --steps steps per trainer")
    ap.add_argument("--rows", type=int, default=256, help="conversations generated for sft")
    ap.add_argument("--lo", type=int, default=20, help="shortest templated conversation (tokens)")
    ap.add_argument("--hi", type=int, default=1000, help="longest templated conversation (tokens)")
    ap.add_argument("--bin", type=int, default=4096, help="tokens per packed row (max_length)")
    ap.add_argument("--batch", type=int, default=2, help="packed rows per step")
    ap.add_argument("--own-bin", type=int, default=1024,
                    help="trl_best: tokens per packed row (one row per micro-batch, accumulated to --bin x --batch)")
    ap.add_argument("--mem-tokens", default="8192", help="comma-separated token counts, e.g. 8192,32768")
    ap.add_argument("--mem-child", nargs=3, metavar=("MODE", "TOKENS", "MODEL"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.mem_child:
        _mem_child(a.mem_child[0], int(a.mem_child[1]), a.mem_child[2])
        return
    from posttrain.core.tiny import make_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(), "command": " ".join(sys.argv),
            "loadavg_start": os.getloadavg(), "torch_threads": __import__("torch").get_num_threads(),
            "mem_available_gib": _available_gib()}
    print(json.dumps({"machine": info}), flush=True)
    results: dict = {"machine": info}
    which = {"sft" if w == "packing" else w for w in a.only.split(",")}
    if "sft" in which:
        variants = a.variants.split(",")
        unknown = set(variants) - set(SFT_VARIANTS)
        if unknown:
            sys.exit(f"unknown --variants {sorted(unknown)}: choose from {SFT_VARIANTS}")
        results["sft"] = []
        for name in a.models.split(","):
            r = bench_sft(work, name, variants, a.steps, a.rounds, a.skip, a.rows, a.lo, a.hi, a.bin, a.batch,
                          a.own_bin)
            r["loadavg_end"] = os.getloadavg()
            results["sft"].append(r)
            print(json.dumps({"sft": r}), flush=True)
    if "dpo" in which:
        results["dpo"] = bench_dpo(make_tiny_model(work / "tiny_dpo", reward=False), work, a.steps, a.rounds)
        print(json.dumps({"dpo": results["dpo"]}), flush=True)
    if "memory" in which:
        results["memory"] = bench_memory(work, [int(x) for x in a.mem_tokens.split(",")])
        print(json.dumps({"memory": results["memory"]}), flush=True)
    info["loadavg_end"] = os.getloadavg()
    if results.get("sft"):
        print("\n| model (params) | variant | exact settings | input tokens/step | trained tokens/step | step s | "
              "input tokens/s | trained tokens/s | vs TRL best, own attention (input / trained) | "
              "vs TRL best + sdpa_varlen (input / trained) |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in results["sft"]:
            print(sft_table(r))
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
