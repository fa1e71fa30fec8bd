"""Benchmark: instructions per second through InsTag tagging with the vLLM backend.

Compares sending all tagging prompts to the engine in one call (what stage
``instag`` does) with sending them one at a time, on the tiny local Qwen2
model (or ``--model DIR``). Both runs use the same prompts, greedy decoding,
the same ``max_tokens`` and include parsing of the outputs. Results are
printed and written as the "## Synthesis (tagging)" section of BENCHMARKS.md
(replacing an older version of that section, leaving the others alone).

    python scripts/bench_synthesis.py [--n 64] [--max-tokens 64] [--model DIR] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_common import cpu_model  # noqa: E402
SECTION = "## Synthesis (tagging)"


def machine() -> str:
    """One line describing the CPU / GPU this ran on."""
    cpu = cpu_model()
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, Python {platform.python_version()}"


def write_section(path: Path, body: str) -> None:
    """Put ``SECTION`` + ``body`` into BENCHMARKS.md, replacing an older copy of that section only."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    block = f"{SECTION}\n\n{body.strip()}\n"
    pat = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pat.search(text):
        text = pat.sub(lambda _: block + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + block
    path.write_text(text, encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="instructions to tag")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model", default=None, help="model folder (default: build the tiny model)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not touch BENCHMARKS.md")
    a = ap.parse_args()

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from data_synthesis.instag import parse_tags, tag_prompt
    from posttrain.core.records import iter_records
    from posttrain.core.sampling.base import SamplerConfig, SamplingParams
    from posttrain.core.sampling.vllm_backend import VLLMSampler

    model = a.model
    if model is None:
        from posttrain.core.tiny import make_tiny_model

        model = str(make_tiny_model(Path(tempfile.mkdtemp(prefix="bench-tiny-")) / "model"))
    texts = [r["prompt"][-1]["content"] for r in iter_records(ROOT / "recipes" / "data" / "instructions.jsonl")]
    texts = [texts[i % len(texts)] + ("" if i < len(texts) else f" (variant {i // len(texts)})") for i in range(a.n)]
    prompts = [tag_prompt(t) for t in texts]
    params = SamplingParams(temperature=0.0, max_tokens=a.max_tokens)

    t0 = time.perf_counter()
    sampler = VLLMSampler(model, cfg=SamplerConfig(backend="vllm", max_model_len=1024))
    startup = time.perf_counter() - t0
    sampler.generate(prompts[:2], params)  # warm-up

    def timed(batches: list[list]) -> tuple[float, int, int]:
        t = time.perf_counter()
        toks = parsed = 0
        for b in batches:
            for comps in sampler.generate(b, params):
                toks += len(comps[0].token_ids)
                parsed += parse_tags(comps[0].text) is not None
        return time.perf_counter() - t, toks, parsed

    batched = timed([prompts])
    single = timed([[p] for p in prompts])
    sampler.close()

    rows = [("all at once", *batched), ("one at a time", *single)]
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    lines = [f"Command: `python scripts/bench_synthesis.py --n {a.n} --max-tokens {a.max_tokens}"
             + (f" --model {a.model}" if a.model else "") + "`",
             f"Date: {date} (commit {commit or '?'}). Machine: {machine()}.",
             f"Model: {'tiny local Qwen2 (hidden 128, 2 layers)' if a.model is None else a.model}, vLLM backend "
             f"(float32 on CPU, enforce_eager), greedy, max_tokens {a.max_tokens}; engine start-up {startup:.1f} s "
             "(not counted). Parsing of every output is included.",
             "",
             "| mode | instructions | seconds | instructions/s | generated tokens/s |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, sec, toks, _ in rows:
        lines.append(f"| {name} | {a.n} | {sec:.2f} | {a.n / sec:.2f} | {toks / sec:.0f} |")
    lines += ["", f"Batching speed-up: {single[0] / batched[0]:.1f}x. The tiny model writes nonsense, so "
              f"{batched[2]}/{a.n} outputs parsed as tags; the numbers measure the engine and plumbing, not quality."]
    body = "\n".join(lines)
    print(body)
    print(json.dumps({"batched_ips": a.n / batched[0], "single_ips": a.n / single[0]}))
    if not a.no_write:
        write_section(ROOT / "BENCHMARKS.md", body)
        print(f"wrote {ROOT / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":  # vLLM spawns its engine process: keep the guard
    sys.exit(main())
