"""Evaluation of checkpoints on a held-out split (stage kind ``eval`` and ``posttrain eval``).

Input: held-out prompt records (``prompt`` messages; ``meta.answer`` for math
problems, ``meta.verifiers`` — a list of ``evaluate(response) -> bool`` sources
— for instruction-following items, ``meta.tests`` — assert statements run in
the sandbox against the response's code — for programming problems; optional when
``benchmarks`` are given), standard benchmarks (``benchmarks:``) and a list of checkpoints
(model folders or ``@stage`` references). Output, in the stage folder (or ``--out``):

* ``eval.jsonl``     one row per checkpoint: accuracy (math answers), format
                     rate, instruction-following pass rate, code-test pass rate
                     and solved fraction, reward-model score,
                     response length, KL to the reference model, n
* ``samples.jsonl``  a few greedy responses per checkpoint, for the report
* ``benchmarks/<checkpoint>/<name>.jsonl``  per-item responses and verdicts of the standard
                     benchmarks (``benchmarks:`` key; HumanEval, MBPP, IFEval, GSM8K, MATH, lm-eval
                     tasks; see ``posttrain.evaluation.benchmarks``), whose scores join the row as
                     ``<name>/<metric>`` (e.g. ``humaneval/pass@1``)

Accuracy uses greedy decoding. KL(policy || reference) is the Monte-Carlo
estimate ``mean over prompts of sum_t [log p(y_t) - log q(y_t)]`` on responses
sampled from the policy at temperature 1. Rows already in ``eval.jsonl`` are
kept on re-run (resumable per checkpoint).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.core.config import key
from posttrain.core.inputs import InputSpec
from posttrain.core.records import to_chat_prompt
from posttrain.core.sampling.base import SamplerConfig, SamplingParams, make_sampler
from posttrain.evaluation.benchmarks import BenchmarkConfig, check_unique, load_items, run_benchmarks
from posttrain.evaluation.stats import bootstrap_ci


@dataclass
class EvalConfig:
    """Keys of stage ``eval``."""

    checkpoints: list[str] = key(doc="model folders, hub ids or @stage refs, one result row each", model=True)
    input: InputSpec | None = key(None, "held-out prompt records (optional when benchmarks are given)",
                                  input="prompt")
    labels: list[str] | None = key(None, "row labels (default: the stage name of each @ref, or the folder name)")
    reference: str | None = key(None, "model for the KL estimate (e.g. the SFT model); none: no KL", model=True)
    reward_model: str | None = key(None, "reward model folder for the mean score; none: skipped", model=True)
    max_tokens: int = key(64, "held-out input: new tokens per greedy response")
    kl_samples: int = key(1, "sampled responses per prompt for the KL estimate")
    samples_kept: int = key(4, "greedy responses per checkpoint kept in samples.jsonl")
    limit: int | None = key(None, "evaluate on the first N records only")
    sampler: SamplerConfig = key(factory=SamplerConfig, doc="generation backend (hf by default)")
    seed: int = key(0, "seed of the input mixture and of the KL samples")
    benchmarks: list[BenchmarkConfig] = key(factory=list, doc="standard benchmarks run on every checkpoint, "
                                            "e.g. [{name: humaneval, limit: 20}, {name: gsm_symbolic}] (keys: "
                                            "posttrain/evaluation/benchmarks.py BenchmarkConfig)")

    def check(self, given: frozenset[str] = frozenset()) -> None:
        """Labels must match checkpoints; something to evaluate; held-out keys need an input."""
        if self.labels is not None and len(self.labels) != len(self.checkpoints):
            raise ValueError(f"labels has {len(self.labels)} entries for {len(self.checkpoints)} checkpoints")
        if not self.checkpoints:
            raise ValueError("checkpoints must name at least one model")
        if self.input is None and not self.benchmarks:
            raise ValueError("nothing to evaluate: give input (held-out records) and/or benchmarks")
        if self.input is None:
            stray = sorted(given & {"reference", "reward_model", "kl_samples", "samples_kept", "max_tokens", "limit",
                                     "seed"})
            if stray:
                raise ValueError(f"{stray[0]} applies to the held-out input, which is not set (remove it)")
        check_unique(self.benchmarks)


def label_of(ref: str) -> str:
    """Default row label of a checkpoint reference."""
    return ref[1:].split("/")[0] if ref.startswith("@") else Path(ref).name


def evaluate_checkpoint(path: str, records: list[dict], cfg: EvalConfig, reference: str | None,
                        reward_model: str | None, sampler: Any = None,
                        chat_template: str | None = None, bench_items: dict[str, Any] | None = None,
                        details_dir: Path | None = None, resolve: Any = lambda x: x) -> tuple[dict, list[dict]]:
    """Evaluate one model folder; return its result row and sample responses.

    ``sampler`` replaces the checkpoint's own sampler (tests, or a caller that serves the model itself);
    ``chat_template`` (the recipe's template text) replaces the checkpoint tokenizer's. Benchmarks
    (``cfg.benchmarks``) use ``bench_items`` when given (loaded once for all checkpoints) and write
    their per-item details under ``details_dir``.
    """
    from reward.answers import format_ok, is_correct

    prompts = [to_chat_prompt(r) for r in records]
    generates = bool(prompts) or any(b.name != "lm_eval" for b in cfg.benchmarks)
    own = sampler is None and generates  # lm_eval alone loads the model itself
    sampler = make_sampler(cfg.sampler, model=path, tokenizer=path, chat_template=chat_template) if own else sampler
    bench: dict[str, Any] = {}
    try:
        greedy = ([c[0] for c in sampler.generate(prompts, SamplingParams(temperature=0.0, max_tokens=cfg.max_tokens))]
                  if prompts else [])
        sampled = None
        if reference and prompts:
            sampled = sampler.generate(prompts, SamplingParams(n=cfg.kl_samples, temperature=1.0,
                                                               max_tokens=cfg.max_tokens, seed=cfg.seed))
        if generates:
            bench = run_benchmarks(cfg.benchmarks, sampler, bench_items, details_dir, resolve)
    finally:
        if own:
            sampler.close()
    for spec in cfg.benchmarks:
        if spec.name == "lm_eval":  # lm-eval loads the model itself: after our sampler let go of it
            from posttrain.evaluation.lm_eval_adapter import run_lm_eval

            bench.update(run_lm_eval(spec, path, details_dir, (bench_items or {}).get("lm_eval")))
    texts = [c.text for c in greedy]
    row: dict[str, Any] = {"path": path}
    if cfg.input is not None:
        row["n"] = len(records)
    if greedy:
        row["length_mean"] = sum(len(c.token_ids) for c in greedy) / len(greedy)
        row["terminated"] = sum(c.terminated for c in greedy) / len(greedy)
    verdicts: dict[str, list[float]] = {}
    math_items = [(t, r["meta"]["answer"]) for t, r in zip(texts, records) if "answer" in r.get("meta", {})]
    if math_items:
        verdicts["accuracy"] = [float(bool(is_correct(t, str(a)))) for t, a in math_items]
        verdicts["format_rate"] = [float(format_ok(t)) for t, _ in math_items]
    if_items = [(t, r["meta"]["verifiers"]) for t, r in zip(texts, records) if r.get("meta", {}).get("verifiers")]
    if if_items:
        from reward.if_verifiers import pass_rates
        from reward.sandbox import SandboxPool

        with SandboxPool() as pool:  # one pool for the checkpoint: a pool per response costs a start each
            verdicts["if_pass_rate"] = [float(pass_rates(v, [t], pool)[0]) for t, v in if_items]
    for name, vs in verdicts.items():
        row[name] = sum(vs) / len(vs)
        if name != "format_rate":  # intervals of the headline metrics (the report pairs them across checkpoints)
            row[f"{name}_ci"] = list(bootstrap_ci(vs))
    row["verdicts"] = verdicts
    code_items = [(t, r["meta"]["tests"]) for t, r in zip(texts, records) if r.get("meta", {}).get("tests")]
    if code_items:
        from reward.code_tests import code_pass_rate

        rates = [code_pass_rate(t, tests) for t, tests in code_items]
        row["code_pass_rate"] = sum(rates) / len(rates)
        row["code_solved"] = sum(r == 1.0 for r in rates) / len(rates)
    if reward_model:
        from reward.scorer import RewardScorer

        scorer = RewardScorer(reward_model)  # its folder carries the template it was trained with
        try:
            row["reward_mean"] = sum(scorer.score(prompts, texts)) / max(1, len(texts))
        finally:
            scorer.close()
    if reference and sampled is not None:
        row["kl_to_ref"] = kl_estimate(path, reference, prompts, sampled, chat_template)
    samples = [{"prompt": p[-1]["content"], "response": t, "answer": r.get("meta", {}).get("answer")}
               for p, t, r in list(zip(prompts, texts, records))[: cfg.samples_kept]]
    row.update(bench)
    return row, samples


def kl_estimate(policy: str, reference: str, prompts: list[list[dict]], sampled: list[list[Any]],
                chat_template: str | None = None) -> float:
    """Monte-Carlo KL(policy || reference): mean over samples of sum_t [log p(y_t) - log q(y_t)]."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.core.losses import response_logprobs

    tok = AutoTokenizer.from_pretrained(policy)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    seqs = []
    for p, cs in zip(prompts, sampled):
        pid = list(tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           chat_template=chat_template)["input_ids"])
        seqs.extend((pid + list(c.token_ids), len(pid)) for c in cs)
    lps = {}
    for name, mpath in (("policy", policy), ("ref", reference)):
        from posttrain.core.distributed import plain_loading

        with plain_loading():
            m = AutoModelForCausalLM.from_pretrained(mpath, dtype=torch.float32).eval()
        with torch.no_grad():
            lps[name] = response_logprobs(m, seqs, pad, "cpu", batch_size=16)
        del m
    return float((lps["policy"] - lps["ref"]).mean()) if seqs else 0.0


def evaluate(cfg: EvalConfig, out_dir: Path, resolve: Any = lambda x: x, sampler: Any = None,
             resolve_model: Any = None, chat_template: str | None = None) -> list[dict]:
    """Evaluate every checkpoint (skipping ones already in ``out_dir/eval.jsonl``); return all rows.

    ``resolve`` maps input paths, ``resolve_model`` model references (default: ``resolve``).
    """
    resolve_model = resolve_model or resolve
    out_dir.mkdir(parents=True, exist_ok=True)
    from posttrain.core.inputs import read_input

    records: list[dict] = []
    if cfg.input is not None:
        records, _ = read_input(cfg.input, "prompt", resolve, cfg.seed, cfg.limit)
        if not records:
            raise ValueError(f"{cfg.input}: no evaluation records")
    labels = cfg.labels or [label_of(c) for c in cfg.checkpoints]
    res_path, smp_path = out_dir / "eval.jsonl", out_dir / "samples.jsonl"
    done = {}
    if res_path.exists():
        for line in res_path.read_text().splitlines():
            if line.strip():
                try:
                    r = json.loads(line)
                    done[r["checkpoint"]] = r
                except json.JSONDecodeError:
                    pass  # a torn last line from a kill: that checkpoint is evaluated again
    bench_items: dict[str, Any] = {}
    if any(lb not in done for lb in labels):
        # benchmark sets are read (and checked) once, before any model is loaded
        bench_items = {b.name: load_items(b, resolve) for b in cfg.benchmarks if b.name != "lm_eval"}
        for b in cfg.benchmarks:
            if b.name == "lm_eval":  # its task names and data are checked here too (the data needs the hub)
                from posttrain.evaluation.lm_eval_adapter import prepare

                bench_items["lm_eval"] = prepare(b, resolve)
    from tqdm.auto import tqdm

    for label, ckpt in tqdm(list(zip(labels, cfg.checkpoints)), desc="eval", dynamic_ncols=True):
        if label in done:
            continue
        row, samples = evaluate_checkpoint(resolve_model(ckpt), records, cfg,
                                           resolve_model(cfg.reference) if cfg.reference else None,
                                           resolve_model(cfg.reward_model) if cfg.reward_model else None, sampler,
                                           chat_template, bench_items, out_dir / "benchmarks" / label, resolve)
        row = {"checkpoint": label, **row}
        done[label] = row
        with open(smp_path, "a", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps({"checkpoint": label, **s}, ensure_ascii=False) + "\n")
        # rewrite whole file: drops any torn line and keeps checkpoint order
        tmp = res_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(done[lb]) + "\n" for lb in labels if lb in done))
        tmp.replace(res_path)
    return [done[lb] for lb in labels]


def run(cfg: EvalConfig, ctx: Any) -> dict:
    """Entry point of stage kind ``eval``."""
    rows = evaluate(cfg, ctx.out_dir, ctx.resolve, ctx.samplers.injected, ctx.resolve_model, ctx.chat_template)
    return {"rows": rows}


def _cell(row: dict, col: str) -> str:
    """One table cell: the value, with its bootstrap 95% interval when the row has one."""
    v = row.get(col)
    if not isinstance(v, float):
        return str(v if v is not None else "")
    ci = row.get(f"{col}_ci")
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci, list) and len(ci) == 2 else f"{v:.3f}"


def format_table(rows: list[dict]) -> str:
    """Markdown table of eval rows (accuracy and pass rates with their bootstrap 95% intervals)."""
    cols = ["accuracy", "format_rate", "if_pass_rate", "code_pass_rate", "code_solved", "reward_mean", "kl_to_ref", "length_mean", "terminated"]
    cols = [c for c in cols if any(c in r for r in rows)]
    # benchmark scores (``name/metric``), in first-seen order; counts (n, skipped...) stay in eval.jsonl
    cols += list(dict.fromkeys(k for r in rows for k, v in r.items() if "/" in k and isinstance(v, float)))
    lines = ["| checkpoint | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        vals = [_cell(r, c) for c in cols]
        lines.append(f"| {r['checkpoint']} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def _benchmarks_from_cli(a: argparse.Namespace) -> list[dict]:
    """``--benchmarks`` / ``--benchmark-limit`` / ``--benchmark-data`` / ``--lm-eval-tasks`` as config entries."""
    from posttrain.core.errors import ConfigError

    data: dict[str, str] = {}
    for kv in a.benchmark_data or []:
        name, sep, path = kv.partition("=")
        if not sep or not path:
            raise ConfigError(f"posttrain eval: --benchmark-data {kv!r}: expected NAME=FILE")
        if name not in (a.benchmarks or []):
            raise ConfigError(f"posttrain eval: --benchmark-data {name}: that benchmark is not in --benchmarks")
        data[name] = path
    out: list[dict] = []
    for name in a.benchmarks or []:
        b: dict[str, Any] = {"name": name}
        if name in data:
            b["data"] = data[name]
        if a.benchmark_limit:
            b["limit"] = a.benchmark_limit
        out.append(b)
    if a.lm_eval_tasks:
        out.append({"name": "lm_eval", "tasks": a.lm_eval_tasks,
                    **({"limit": a.benchmark_limit} if a.benchmark_limit else {})})
    return out


def _cmd_eval(a: argparse.Namespace) -> int:
    from posttrain.core.config import build

    raw: dict[str, Any] = {"checkpoints": a.checkpoints}
    if a.input:
        raw["input"] = a.input
    if a.max_tokens is not None:
        raw["max_tokens"] = a.max_tokens
    if a.reference:
        raw["reference"] = a.reference
    if a.reward_model:
        raw["reward_model"] = a.reward_model
    if a.limit:
        raw["limit"] = a.limit
    if a.backend:
        raw["sampler"] = {"backend": a.backend}
    benchmarks = _benchmarks_from_cli(a)
    if benchmarks:
        raw["benchmarks"] = benchmarks
    from posttrain.core import modelref

    cfg = build(EvalConfig, raw, "", "posttrain eval")
    if cfg.input is not None and not Path(cfg.input).exists():
        raise FileNotFoundError(f"posttrain eval: --input: not found: {cfg.input}")
    for b in cfg.benchmarks:
        if b.data and not Path(b.data).exists():
            raise FileNotFoundError(f"posttrain eval: --benchmark-data {b.name}: not found: {b.data}")
    for p in [*cfg.checkpoints, cfg.reference, cfg.reward_model]:
        why = modelref.check(p) if p else None
        if why:
            raise FileNotFoundError(f"posttrain eval: {why}")
    rows = evaluate(cfg, Path(a.out), resolve_model=modelref.resolve)
    print(format_table(rows))
    return 0


def add_cli(sub) -> None:
    """Register ``posttrain eval``."""
    e = sub.add_parser("eval", help="evaluate checkpoints on a held-out split and/or standard benchmarks "
                                    "(one row per checkpoint)")
    e.add_argument("--input", help="held-out prompt records (meta.answer / meta.verifiers / meta.tests)")
    e.add_argument("--checkpoints", nargs="+", required=True)
    e.add_argument("--reference", help="model for the KL estimate (e.g. the SFT model)")
    e.add_argument("--reward-model")
    e.add_argument("--out", required=True, help="folder for eval.jsonl and samples.jsonl")
    e.add_argument("--max-tokens", type=int, help="held-out input: new tokens per response (default 64)")
    e.add_argument("--limit", type=int, help="held-out input: first N records")
    e.add_argument("--backend", choices=["hf", "vllm", "openai"])
    e.add_argument("--benchmarks", nargs="+", metavar="NAME",
                   help="humaneval mbpp ifeval ifeval_gen gsm8k gsm_symbolic math (offline without data: "
                        "humaneval, gsm_symbolic, ifeval_gen)")
    e.add_argument("--benchmark-limit", type=int, metavar="N", help="first N items of each benchmark")
    e.add_argument("--benchmark-data", action="append", metavar="NAME=FILE",
                   help="a local file for a benchmark (required for mbpp, ifeval, gsm8k, math)")
    e.add_argument("--lm-eval-tasks", nargs="+", metavar="TASK",
                   help="also run these lm-evaluation-harness tasks (their data comes from the HF hub)")
    e.set_defaults(fn=_cmd_eval)
