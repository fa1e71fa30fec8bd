"""Generated tokens/s of the hf and vllm backends on the tiny model: all prompts at once vs one at a time.

Usage: .venv/bin/python scripts/bench_sampler.py [--prompts 32] [--max-tokens 64] [--repeats 3]
Prints a Markdown table (the BENCHMARKS.md "Samplers" section). The four variants are interleaved
round-robin within each repeat so machine noise hits them alike; the median of the repeats is reported.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def main() -> None:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", default="hf,vllm")
    a = ap.parse_args()

    from posttrain.core.sampling import SamplerConfig, SamplingParams
    from posttrain.core.tiny import make_tiny_model

    model = str(make_tiny_model(tempfile.mkdtemp() + "/tiny", reward=False))
    prompts = [[{"role": "user", "content": f"What is {i} + {2 * i}? Explain step by step."}] for i in range(a.prompts)]
    # temperature 1 with ignore-free max_tokens: a random tiny model rarely emits eos, so lengths are ~max_tokens
    params = SamplingParams(n=1, temperature=1.0, max_tokens=a.max_tokens, seed=0)
    samplers = {}
    for b in a.backends.split(","):
        if b == "hf":
            from posttrain.core.sampling.hf import HFSampler

            samplers[b] = HFSampler(model, cfg=SamplerConfig(batch_size=a.prompts))
        elif b == "vllm":
            from posttrain.core.sampling.vllm_backend import VLLMSampler

            samplers[b] = VLLMSampler(model, cfg=SamplerConfig(backend="vllm", max_model_len=1024))
    for s in samplers.values():  # warm-up
        s.generate(prompts[:2], params)
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(a.repeats):
        for name, s in samplers.items():
            for mode in ("batched", "one-at-a-time"):
                t0 = time.perf_counter()
                if mode == "batched":
                    outs = s.generate(prompts, params)
                else:
                    outs = [s.generate([p], params)[0] for p in prompts]
                dt = time.perf_counter() - t0
                toks = sum(len(c.token_ids) for o in outs for c in o)
                times.setdefault((name, mode), []).append(toks / dt)
    print(f"| backend | mode | generated tokens/s (median of {a.repeats}) | vs one-at-a-time |")
    print("|---|---|---|---|")
    for name in samplers:
        single = statistics.median(times[(name, "one-at-a-time")])
        for mode in ("batched", "one-at-a-time"):
            v = statistics.median(times[(name, mode)])
            print(f"| {name} | {mode} | {v:.0f} | {v / single:.2f}x |")
    for s in samplers.values():
        s.close()


if __name__ == "__main__":
    main()
