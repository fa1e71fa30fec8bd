"""GPU benchmarks of the toolkit (issue 18), with a tiny CPU dry-run mode; part of ``scripts/gpu_check.sh``.

    python scripts/bench_gpu.py prepare --work W [--tiny]        # build the benchmark model once
    python scripts/bench_gpu.py run sft,dpo,generate,online --work W --json F [--tiny] [--device cpu]
    python scripts/bench_gpu.py all --tiny --device cpu --json F # prepare + every benchmark in one process

Inputs: nothing but installed packages. ``prepare`` writes a Qwen2-0.5B-shaped causal LM with random
weights and Qwen2's real 151,936-row vocabulary (``posttrain.core.tiny``: hidden 896, 24 layers, 14
heads / 2 KV heads, MLP 4864, tied embeddings) plus a reward model of the same shape to ``W/model``;
``--tiny`` writes a 2-layer tiny-tokenizer model instead, so every benchmark runs on a CPU in seconds.

Outputs: one JSON object per call (``--json``), one key per benchmark:

* ``matmul``: the measured bf16 matrix-product rate (the practical ceiling; 8192^3, CUDA events);
* ``sft``: the sft stage's trainer on packed mixed-length conversations at 8K and 32K tokens per row,
  with and without Liger: tokens/s, step seconds, peak memory and MFU = model FLOPs per second over the
  device's dense bf16 peak (``flops_per_step``; also over the measured matmul rate);
* ``dpo``: the dpo stage's trainer, padded (TRL's collator) vs packed (one row per micro-batch);
* ``generate``: generation tokens/s of the vLLM sampler (and of the transformers sampler, always);
* ``online``: one online-DPO run (vLLM colocated with sleep mode, else a transformers copy): seconds per
  episode of each phase (generate, score, kl, train, push, verify) and the weight-sync share.

A benchmark that cannot run says why (``skipped``: a missing component; ``error``: what broke) and the
others still run. ``scripts/gpu_results.py probe`` says which components are installed; it merges the
results into the report.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import bench_common  # noqa: F401  (puts the repository root on sys.path; offline environment)
from bench_common import mixed_conversations, step_timer

BENCHES = ("matmul", "sft", "dpo", "generate", "online")
# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s; GPU_PEAK_TFLOPS overrides.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "GH200": 989.4,
                    "A100": 312.0, "L40S": 362.1, "A10G": 70.0, "L4": 121.0}


@dataclass
class Sizes:
    """Benchmark sizes: ``GPU`` on the lent machine, ``TINY`` for the CPU dry run."""

    tokenizer: str = "qwen2"
    shape: str = "qwen2-0.5b"
    layers: int = 24
    matmul: int = 8192
    sft_bins: tuple[int, ...] = (8192, 32768)
    sft_steps: int = 5
    sft_skip: int = 2
    conv_lo: int = 32
    conv_hi: int = 4096
    dpo_batch: int = 8
    dpo_steps: int = 6
    dpo_skip: int = 2
    pair_lo: int = 64
    pair_hi: int = 1024
    gen_prompts: int = 64
    gen_n: int = 4
    gen_tokens: int = 256
    od_episodes: int = 3
    od_prompts: int = 16
    od_n: int = 4
    od_tokens: int = 128
    od_batch: int = 8


GPU = Sizes()
TINY = Sizes(tokenizer="tiny", shape="tiny", layers=2, matmul=256, sft_bins=(256, 1024), sft_steps=3, sft_skip=1,
             conv_lo=16, conv_hi=200, dpo_batch=2, dpo_steps=3, dpo_skip=1, pair_lo=16, pair_hi=48, gen_prompts=4,
             gen_n=2, gen_tokens=8, od_episodes=2, od_prompts=2, od_n=2, od_tokens=8, od_batch=2)


# ---------------------------------------------------------------- FLOPs and timing

def peak_tflops(name: str) -> float | None:
    """The device's dense bf16 peak (TFLOP/s) from ``GPU_PEAK_TFLOPS`` or the datasheet table; None if unknown."""
    if os.environ.get("GPU_PEAK_TFLOPS"):
        return float(os.environ["GPU_PEAK_TFLOPS"])
    for key, v in PEAK_BF16_TFLOPS.items():  # longest names first in the table where they overlap
        if key in name:
            return v
    return None



def model_dims(config: Any) -> dict:
    """Hidden size, layers, KV width, MLP width and vocabulary of a Qwen2-style config."""
    h, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    return {"hidden": h, "layers": config.num_hidden_layers, "q_width": heads * head_dim,
            "kv_width": config.num_key_value_heads * head_dim, "mlp": config.intermediate_size,
            "vocab": config.vocab_size}


def matmul_params(d: dict) -> int:
    """Weights that take part in a matrix product per token: q/k/v/o and the SwiGLU MLP of every layer, plus the
    LM head (tied to the embedding, whose lookup is free, but the head's product is not)."""
    per_layer = d["hidden"] * (2 * d["q_width"] + 2 * d["kv_width"]) + 3 * d["hidden"] * d["mlp"]
    return d["layers"] * per_layer + d["vocab"] * d["hidden"]


def train_flops(d: dict, doc_lens: list[int], passes: float = 3.0, causal: bool = True) -> float:
    """Model FLOPs of ``passes`` forward-equivalents (3 = forward + backward) over documents of ``doc_lens`` tokens.

    Per token 2 FLOPs per matmul weight; per layer and document of s tokens, attention scores and the weighted sum
    take 2 * 2 * s^2 * q_width (half of it under a causal mask, as flash attention computes). Recomputation by
    gradient checkpointing is not counted (model FLOPs, not hardware FLOPs).
    """
    attn = sum(s * s for s in doc_lens) * 4 * d["q_width"] * d["layers"] * (0.5 if causal else 1.0)
    return passes * (2 * matmul_params(d) * sum(doc_lens) + attn)


def doc_lengths(batch: dict) -> list[int]:
    """Token counts of the documents of a collated batch: packed rows (``cu_seq_lens*`` or restarting
    ``position_ids``) or padded rows (``attention_mask`` row sums)."""
    for k in ("cu_seq_lens", "cu_seq_lens_q"):
        if k in batch:
            cu = batch[k].tolist()
            return [b - a for a, b in zip(cu, cu[1:]) if b > a]
    if "attention_mask" in batch:
        return [int(x) for x in batch["attention_mask"].sum(-1).tolist()]
    if "position_ids" in batch:
        lens = []
        for row in batch["position_ids"].tolist():
            starts = [i for i, p in enumerate(row) if p == 0] + [len(row)]
            lens += [b - a for a, b in zip(starts, starts[1:]) if b > a]
        return lens
    return [int(batch["input_ids"].shape[-1])] * int(batch["input_ids"].shape[0])


class DocCounter:
    """Wraps a collator; records the document lengths and trained-label count of every batch it builds."""

    def __init__(self, inner: Any):
        self.inner, self.seen = inner, []

    def __call__(self, examples: list) -> Any:
        b = self.inner(examples)
        lens = doc_lengths(b)
        if "labels" in b:  # sft: the shifted labels that carry loss
            trained = int(b["labels"][:, 1:].ne(-100).sum())
        else:  # dpo: the completion tokens
            trained = int(b["completion_mask"].sum()) if "completion_mask" in b else 0
        self.seen.append({"lens": lens, "trained": trained, "rows": len(examples)})
        return b


def cuda_sync_callback() -> Any:
    """A Trainer callback that waits for the GPU at each step's start and end (added before the step timer, so the
    timer reads finished work rather than queued kernels)."""
    import torch
    from transformers import TrainerCallback

    class Sync(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
            torch.cuda.synchronize()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            torch.cuda.synchronize()

    return Sync()


def timed_train(trainer: Any, skip: int, cuda: bool, flops_passes: float, dims: dict) -> dict:
    """Train the trainer's ``max_steps``; tokens/s, step time and FLOPs of the steps after ``skip`` (one micro-batch
    per step)."""
    import torch

    counter = DocCounter(trainer.data_collator)
    trainer.data_collator = counter
    if cuda:
        trainer.add_callback(cuda_sync_callback())
        torch.cuda.reset_peak_memory_stats()
    timer = step_timer()
    trainer.add_callback(timer)
    trainer.train()
    steps = list(zip(counter.seen, timer.t))[skip:]
    if not steps:
        raise RuntimeError(f"no timed steps ({len(timer.t)} steps ran, {skip} skipped)")
    secs = sum(t for _, t in steps)
    tokens = sum(sum(b["lens"]) for b, _ in steps)
    flops = sum(train_flops(dims, b["lens"], flops_passes) for b, _ in steps)
    return {"timed_steps": len(steps), "step_s": secs / len(steps), "step_s_each": [round(t, 4) for _, t in steps],
            "tokens_per_step": tokens / len(steps), "tokens_per_s": tokens / secs,
            "trained_tokens_per_s": sum(b["trained"] for b, _ in steps) / secs,
            "rows_per_s": sum(b["rows"] for b, _ in steps) / secs, "docs_per_step": statistics.mean(
                len(b["lens"]) for b, _ in steps), "flops_per_step": flops / len(steps), "model_tflops_per_s": flops / secs / 1e12,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def add_mfu(run: dict, peak: float | None, measured: float | None) -> None:
    """MFU against the datasheet peak and against the measured matmul rate (both TFLOP/s), when known."""
    if "model_tflops_per_s" in run:
        run["mfu"] = run["model_tflops_per_s"] / peak if peak else None
        run["mfu_vs_matmul"] = run["model_tflops_per_s"] / measured if measured else None


def _free() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


@contextlib.contextmanager
def restored_qwen2_globals():
    """Liger patches transformers' Qwen2 module globals (RoPE, RMSNorm, MLP): restore them so the next model is
    plain again (as tests/test_gpu.py's fixture does)."""
    from transformers.models.qwen2 import modeling_qwen2 as mq

    saved = {n: getattr(mq, n) for n in ("apply_rotary_pos_emb", "Qwen2RMSNorm", "Qwen2MLP") if hasattr(mq, n)}
    try:
        yield
    finally:
        for n, v in saved.items():
            setattr(mq, n, v)


def guarded(fn: Any, *a: Any, **kw: Any) -> dict:
    """``fn(*a, **kw)``, or ``{"error": ...}`` with the last traceback lines when it raises."""
    try:
        return fn(*a, **kw)
    except Exception as e:  # noqa: BLE001 - one failing configuration must not lose the others
        tb = traceback.format_exc().strip().splitlines()
        return {"error": f"{type(e).__name__}: {e}"[:600], "where": " | ".join(tb[-4:-1])[-600:]}
    finally:
        _free()


# ---------------------------------------------------------------- benchmarks

def prepare(work: Path, sz: Sizes) -> Path:
    """The benchmark policy (+ reward model in ``reward/``) in ``work/model``, built once."""
    from posttrain.core.tiny import TinySpec, make_tiny_model

    mdir = work / "model"
    if not (mdir / "reward" / "config.json").exists():
        spec = TinySpec(tokenizer=sz.tokenizer, shape=sz.shape, num_hidden_layers=sz.layers,
                        max_position_embeddings=max(4096, *sz.sft_bins))
        make_tiny_model(mdir, spec, reward=True)
    return mdir


def bench_matmul(n: int, cuda: bool) -> dict:
    """Mean TFLOP/s of ``n^3`` bf16 products on random data (3 warm-ups, 10 timed; fp32 on CPU)."""
    import torch

    dev, dt = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    a, b = (torch.randn(n, n, device=dev, dtype=dt) for _ in range(2))
    for _ in range(3):
        a @ b
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        torch.cuda.synchronize()
        secs = start.elapsed_time(end) / 1000
    else:
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        secs = time.perf_counter() - t
    return {"n": n, "dtype": str(dt).split(".")[-1], "tflops": 10 * 2 * n**3 / secs / 1e12}


def bench_sft(mdir: Path, work: Path, sz: Sizes, cuda: bool, peak: float | None, measured: float | None) -> dict:
    """The sft stage's trainer at each packed row size, Liger off and on (and sdpa_varlen when flash-attn is absent)."""
    from transformers import AutoConfig, AutoTokenizer

    from posttrain.core.attention import pick_attention, register_sdpa_varlen
    from posttrain.core.chat import training_template
    from posttrain.core.trainkit import TrainArgs, liger_available
    from posttrain.trainers.sft import SFTStageConfig, build_sft_trainer, prepare_rows

    tok = AutoTokenizer.from_pretrained(mdir)
    dims = model_dims(AutoConfig.from_pretrained(mdir))
    default_attn = pick_attention(None, "sdpa", packed=True)  # what the stage picks on this machine
    out: dict[str, Any] = {"default_attn": default_attn, "dims": dims, "runs": []}
    for bin_tokens in sz.sft_bins:
        hi = min(sz.conv_hi, bin_tokens)
        n_rows = int(1.6 * bin_tokens * sz.sft_steps / ((sz.conv_lo + hi) / 2)) + 4  # enough for every step's row
        convs = mixed_conversations(tok, n_rows, sz.conv_lo, hi, seed=bin_tokens)
        rows, stats = prepare_rows([{"messages": m} for m in convs], tok, training_template(tok), bin_tokens, "drop",
                                   True, "bench")
        configs = [(default_attn, False), (default_attn, True)]
        if cuda and default_attn != "flash_attention_2" and bin_tokens == max(sz.sft_bins):
            configs.append((register_sdpa_varlen(), False))  # the per-document stand-in, for comparison
        for attn, liger in configs:
            run: dict[str, Any] = {"bin_tokens": bin_tokens, "attn": attn, "liger": liger, "rows": stats["rows"]}
            if liger and not (cuda and liger_available()):
                run["skipped"] = "liger-kernel is not installed" if cuda else "Liger needs a CUDA GPU"
            else:
                def one() -> dict:
                    t = TrainArgs(per_device_train_batch_size=1, max_steps=sz.sft_steps, learning_rate=1e-5,
                                  min_learning_rate=1e-6, logging_steps=10**6, report_to=[],
                                  gradient_checkpointing=False, use_liger_kernel=liger, seed=0)
                    cfg = SFTStageConfig(input="bench", max_length=bin_tokens, train=t)
                    with restored_qwen2_globals():
                        tr = build_sft_trainer(cfg, str(mdir), tok, rows, None, work / f"sft-{bin_tokens}-{attn}-{liger}",
                                               seed=0, attn=attn)
                        tr.args.disable_tqdm = True
                        r = timed_train(tr, sz.sft_skip, cuda, 3.0, dims)
                        r["weights_dtype"] = str(next(tr.model.parameters()).dtype).split(".")[-1]
                        r["bf16_autocast"] = bool(tr.args.bf16)
                    return r

                run.update(guarded(one))
                add_mfu(run, peak, measured)
            out["runs"].append(run)
            print(json.dumps({"sft": run}), flush=True)
    return out


def bench_dpo(mdir: Path, work: Path, sz: Sizes, cuda: bool, peak: float | None, measured: float | None) -> dict:
    """The dpo stage's trainer, padded vs packed, on the same mixed-length pairs (live reference model)."""
    from transformers import AutoConfig, AutoTokenizer

    from bench_pairs import mixed_pairs
    from posttrain.core.attention import pick_attention
    from posttrain.trainers.dpo import DPOStageConfig, DPOTrainArgs, build_dpo_trainer

    tok = AutoTokenizer.from_pretrained(mdir)
    dims = model_dims(AutoConfig.from_pretrained(mdir))
    rows = mixed_pairs(tok, sz.dpo_batch * sz.dpo_steps, sz.pair_lo, sz.pair_hi)
    out: dict[str, Any] = {"dims": dims, "runs": []}
    for packed in (False, True):
        attn = pick_attention(None, "sdpa", packed=packed)

        def one() -> dict:
            t = DPOTrainArgs(per_device_train_batch_size=sz.dpo_batch, max_steps=sz.dpo_steps, learning_rate=1e-6,
                             min_learning_rate=1e-7, logging_steps=10**6, report_to=[], gradient_checkpointing=False,
                             use_liger_kernel=False, seed=0)
            cfg = DPOStageConfig(input="bench", packing=packed, max_length=None, train=t)
            tr = build_dpo_trainer(cfg, str(mdir), tok, rows, None, work / f"dpo-{packed}", 0, "auto", attn)
            tr.args.disable_tqdm = True
            # policy forward + backward (3 passes) and the live reference's forward (1 pass)
            return timed_train(tr, sz.dpo_skip, cuda, 4.0, dims)

        run = {"variant": "packed" if packed else "padded", "attn": attn, "pairs_per_step": sz.dpo_batch} | guarded(one)
        add_mfu(run, peak, measured)
        if "rows_per_s" in run:
            run["pairs_per_s"] = run["rows_per_s"]
        out["runs"].append(run)
        print(json.dumps({"dpo": run}), flush=True)
    ok = {r["variant"]: r for r in out["runs"] if "pairs_per_s" in r}
    if len(ok) == 2:
        out["packed_over_padded"] = ok["packed"]["pairs_per_s"] / ok["padded"]["pairs_per_s"]
    return out


def _prompts(n: int) -> list[list[dict]]:
    from bench_online_dpo import TOPICS

    return [[{"role": "user", "content": f"Write about {TOPICS[i % len(TOPICS)]}, part {i}."}] for i in range(n)]


def _vllm_ok(cuda: bool, allow_cpu: bool) -> str | None:
    """None when the vLLM benchmarks can run, else why not."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed"
    if not cuda and not allow_cpu:
        return "vLLM on CPU is left out of the dry run (its engine start alone takes ~40 s; --cpu-vllm runs it)"
    return None


def bench_generate(mdir: Path, sz: Sizes, cuda: bool, allow_cpu_vllm: bool) -> dict:
    """Generated tokens/s: the vLLM sampler (when installed) and the transformers sampler, same prompts."""
    from posttrain.core.sampling.base import SamplerConfig, SamplingParams

    prompts = _prompts(sz.gen_prompts)
    params = SamplingParams(n=sz.gen_n, temperature=1.0, max_tokens=sz.gen_tokens, seed=0)
    out: dict[str, Any] = {"prompts": len(prompts), "n": sz.gen_n, "max_tokens": sz.gen_tokens, "runs": []}
    why = _vllm_ok(cuda, allow_cpu_vllm)
    for backend in ("vllm", "hf"):
        if backend == "vllm" and why:
            out["runs"].append({"backend": "vllm", "skipped": why})
            continue

        def one() -> dict:
            t0 = time.perf_counter()
            if backend == "vllm":
                from posttrain.core.sampling.vllm_backend import VLLMSampler

                s = VLLMSampler(str(mdir), cfg=SamplerConfig(backend="vllm", max_model_len=2048,
                                                             gpu_memory_utilization=0.5))
            else:
                from posttrain.core.sampling.hf import HFSampler

                s = HFSampler(str(mdir), cfg=SamplerConfig(batch_size=len(prompts) * sz.gen_n))  # one generate()
            start = time.perf_counter() - t0
            try:
                s.generate(prompts[:2], params)  # warm-up (kernels, allocator)
                t = time.perf_counter()
                res = s.generate(prompts, params)
                secs = time.perf_counter() - t
            finally:
                s.close()
            toks = sum(len(c.token_ids) for cs in res for c in cs)
            return {"engine_start_s": start, "seconds": secs, "tokens": toks, "tokens_per_s": toks / secs,
                    "enforce_eager": SamplerConfig().enforce_eager if backend == "vllm" else None}

        run = {"backend": backend} | guarded(one)
        out["runs"].append(run)
        print(json.dumps({"generate": run}), flush=True)
    return out


PHASES = ("generate", "score", "gather", "kl", "train", "push", "verify")


def episode_split(metrics: list[dict], warmup: int = 1) -> dict:
    """Mean seconds per episode of each phase over the episodes after ``warmup``, the episode total and the
    weight-sync share (push + verify over the episode)."""
    ms = metrics[warmup:] if len(metrics) > warmup else metrics
    out: dict[str, Any] = {"episodes_timed": len(ms)}
    for k in PHASES:
        out[k] = statistics.mean(m.get(f"time_{k}", 0.0) for m in ms)
    out["episode"] = sum(out[k] for k in PHASES)
    out["sync"] = out["push"] + out["verify"]
    out["sync_share"] = out["sync"] / out["episode"] if out["episode"] else None
    out["pairs"] = statistics.mean(m["pairs"] for m in ms)
    out["sync_logprob_diff"] = max(m.get("sync_logprob_diff", 0.0) for m in metrics)
    out["sync_chunks"] = max(m.get("sync_chunks", 0) for m in metrics)
    return out


def bench_online(mdir: Path, work: Path, sz: Sizes, cuda: bool, allow_cpu_vllm: bool) -> dict:
    """One online_dpo stage run (policy and reward model of the benchmark shape); the per-phase episode split."""
    from bench_online_dpo import _write_prompts
    from posttrain.stages import recipe_from_dict

    why = _vllm_ok(cuda, allow_cpu_vllm)
    if why is None:
        sampler = {"backend": "vllm", "max_model_len": 1024}
        if cuda:  # colocated: the engine sleeps while the policy trains
            sampler.update(enable_sleep_mode=True, gpu_memory_utilization=0.3)
        extra: dict = {}
    else:  # a separate transformers copy: the same push + verify path, without vLLM
        sampler, extra = {"backend": "hf"}, {"share_weights": False}
    data = _write_prompts(work, sz.od_episodes * sz.od_prompts)
    stage = {"kind": "online_dpo", "input": str(data), "model": str(mdir), "reward_model": str(mdir / "reward"),
             "episodes": sz.od_episodes, "prompts_per_episode": sz.od_prompts,
             "sampling": {"n": sz.od_n, "temperature": 1.0, "max_tokens": sz.od_tokens},
             "batch_size": sz.od_batch, "max_length": 512, "train": {"learning_rate": 1e-6, "report_to": []},
             "checkpoint_every": 0, "sampler": sampler, **extra}
    out_dir = work / f"online-{sampler['backend']}"

    def one() -> dict:
        t = time.perf_counter()
        recipe_from_dict({"output_dir": str(out_dir), "seed": 0, "stages": [stage]}, work / "online.yaml").run()
        wall = time.perf_counter() - t
        ms = [json.loads(x) for x in (out_dir / "online_dpo" / "metrics.jsonl").read_text().splitlines()]
        return {"wall_s": wall, **episode_split(ms)}

    res = {"sampler": sampler, "vllm_missing": why, "prompts_per_episode": sz.od_prompts, "n": sz.od_n,
           "max_tokens": sz.od_tokens} | guarded(one)
    print(json.dumps({"online": res}), flush=True)
    return res


def run_benches(names: list[str], work: Path, sz: Sizes, allow_cpu_vllm: bool) -> dict:
    """Run the named benchmarks in order (``matmul`` first when SFT/DPO need its rate); one result per name."""
    import torch

    cuda = torch.cuda.is_available()
    mdir = prepare(work, sz)
    peak = peak_tflops(torch.cuda.get_device_name(0)) if cuda else None
    res: dict[str, Any] = {"cuda": cuda, "peak_bf16_tflops": peak, "sizes": asdict(sz)}
    measured = None
    if {"matmul", "sft", "dpo"} & set(names):
        res["matmul"] = guarded(bench_matmul, sz.matmul, cuda)
        measured = res["matmul"].get("tflops") if cuda else None
    for name in names:
        t = time.perf_counter()
        if name == "sft":
            res["sft"] = guarded(bench_sft, mdir, work, sz, cuda, peak, measured)
        elif name == "dpo":
            res["dpo"] = guarded(bench_dpo, mdir, work, sz, cuda, peak, measured)
        elif name == "generate":
            res["generate"] = guarded(bench_generate, mdir, sz, cuda, allow_cpu_vllm)
        elif name == "online":
            res["online"] = guarded(bench_online, mdir, work, sz, cuda, allow_cpu_vllm)
        if name in res and isinstance(res[name], dict):
            res[name]["seconds"] = time.perf_counter() - t
    return res


def main() -> None:
    """Command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("prepare", "run", "all"))
    ap.add_argument("what", nargs="?", default="", help="run: comma list of " + ", ".join(BENCHES))
    ap.add_argument("--work", type=Path, default=None, help="folder for the model and trainer outputs")
    ap.add_argument("--json", type=Path, default=None, help="write the result here")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (CPU dry run)")
    ap.add_argument("--device", choices=("auto", "cpu"), default="auto", help="cpu: hide any GPU")
    ap.add_argument("--cpu-vllm", action="store_true", help="run the vLLM benchmarks on CPU too (slow start)")
    a = ap.parse_args()
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: the project then sees no GPU
    t0 = time.perf_counter()
    import tempfile

    sz = TINY if a.tiny else GPU
    work = a.work or Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    work.mkdir(parents=True, exist_ok=True)
    if a.command == "prepare":
        res: dict[str, Any] = {"model": str(prepare(work, sz))}
    else:
        names = list(BENCHES[1:]) if a.command == "all" or not a.what else [x for x in a.what.split(",") if x]
        bad = set(names) - set(BENCHES)
        if bad:
            ap.error(f"unknown benchmark(s) {sorted(bad)}: choose from {', '.join(BENCHES)}")
        res = run_benches(names, work, sz, a.cpu_vllm)
    res["tiny"] = a.tiny
    res["command"] = " ".join(sys.argv[1:])
    res["seconds_total"] = time.perf_counter() - t0
    if a.json:  # the file holds the result; the log gets a summary
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1, default=str))
        print(f"wrote {a.json} ({res['seconds_total']:.1f} s)", flush=True)
    else:
        print("RESULT " + json.dumps(res, default=str), flush=True)


if __name__ == "__main__":
    main()
