"""Evaluation of checkpoints on a held-out split (stage kind ``eval`` and ``posttrain eval``).

Input: held-out prompt records (``prompt`` messages; ``meta.answer`` for math
problems, ``meta.verifiers`` — a list of ``evaluate(response) -> bool`` sources
— for instruction-following items, ``meta.tests`` — assert statements run in
the sandbox against the response's code — for programming problems) and a list of checkpoints (model folders or
``@stage`` references). Output, in the stage folder (or ``--out``):

* ``eval.jsonl``     one row per checkpoint: accuracy (math answers), format
                     rate, instruction-following pass rate, code-test pass rate
                     and solved fraction, reward-model score,
                     response length, KL to the reference model, n
* ``samples.jsonl``  a few greedy responses per checkpoint, for the report

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


@dataclass
class EvalConfig:
    """Keys of stage ``eval``."""

    input: InputSpec = key(doc="held-out prompt records", input="prompt")
    checkpoints: list[str] = key(doc="model folders, hub ids or @stage refs, one result row each", model=True)
    labels: list[str] | None = key(None, "row labels (default: the stage name of each @ref, or the folder name)")
    reference: str | None = key(None, "model for the KL estimate (e.g. the SFT model); none: no KL", model=True)
    reward_model: str | None = key(None, "reward model folder for the mean score; none: skipped", model=True)
    max_tokens: int = 64
    kl_samples: int = key(1, "sampled responses per prompt for the KL estimate")
    samples_kept: int = key(4, "greedy responses per checkpoint kept in samples.jsonl")
    limit: int | None = key(None, "evaluate on the first N records only")
    sampler: SamplerConfig = key(factory=SamplerConfig, doc="generation backend (hf by default)")
    seed: int = 0

    def check(self) -> None:
        """Labels must match checkpoints."""
        if self.labels is not None and len(self.labels) != len(self.checkpoints):
            raise ValueError(f"labels has {len(self.labels)} entries for {len(self.checkpoints)} checkpoints")
        if not self.checkpoints:
            raise ValueError("checkpoints must name at least one model")


def label_of(ref: str) -> str:
    """Default row label of a checkpoint reference."""
    return ref[1:].split("/")[0] if ref.startswith("@") else Path(ref).name


def evaluate_checkpoint(path: str, records: list[dict], cfg: EvalConfig, reference: str | None,
                        reward_model: str | None, sampler: Any = None,
                        chat_template: str | None = None) -> tuple[dict, list[dict]]:
    """Evaluate one model folder; return its result row and sample responses.

    ``sampler`` replaces the checkpoint's own sampler (tests, or a caller that serves the model itself);
    ``chat_template`` (the recipe's template text) replaces the checkpoint tokenizer's.
    """
    from reward.answers import format_ok, is_correct

    prompts = [to_chat_prompt(r) for r in records]
    own = sampler is None
    sampler = make_sampler(cfg.sampler, model=path, tokenizer=path, chat_template=chat_template) if own else sampler
    try:
        greedy = [c[0] for c in sampler.generate(prompts, SamplingParams(temperature=0.0, max_tokens=cfg.max_tokens))]
        sampled = None
        if reference:
            sampled = sampler.generate(prompts, SamplingParams(n=cfg.kl_samples, temperature=1.0,
                                                               max_tokens=cfg.max_tokens, seed=cfg.seed))
    finally:
        if own:
            sampler.close()
    texts = [c.text for c in greedy]
    row: dict[str, Any] = {"path": path, "n": len(records),
                           "length_mean": sum(len(c.token_ids) for c in greedy) / max(1, len(greedy)),
                           "terminated": sum(c.terminated for c in greedy) / max(1, len(greedy))}
    math_items = [(t, r["meta"]["answer"]) for t, r in zip(texts, records) if "answer" in r.get("meta", {})]
    if math_items:
        row["accuracy"] = sum(bool(is_correct(t, str(a))) for t, a in math_items) / len(math_items)
        row["format_rate"] = sum(format_ok(t) for t, _ in math_items) / len(math_items)
    if_items = [(t, r["meta"]["verifiers"]) for t, r in zip(texts, records) if r.get("meta", {}).get("verifiers")]
    if if_items:
        from reward.if_verifiers import evaluate_response

        row["if_pass_rate"] = sum(float(evaluate_response(v, t)) for t, v in if_items) / len(if_items)
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
    from tqdm.auto import tqdm

    for label, ckpt in tqdm(list(zip(labels, cfg.checkpoints)), desc="eval", dynamic_ncols=True):
        if label in done:
            continue
        row, samples = evaluate_checkpoint(resolve_model(ckpt), records, cfg,
                                           resolve_model(cfg.reference) if cfg.reference else None,
                                           resolve_model(cfg.reward_model) if cfg.reward_model else None, sampler,
                                           chat_template)
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


def format_table(rows: list[dict]) -> str:
    """Markdown table of eval rows."""
    cols = ["accuracy", "format_rate", "if_pass_rate", "code_pass_rate", "code_solved", "reward_mean", "kl_to_ref", "length_mean", "terminated"]
    cols = [c for c in cols if any(c in r for r in rows)]
    lines = ["| checkpoint | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        vals = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        lines.append(f"| {r['checkpoint']} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def _cmd_eval(a: argparse.Namespace) -> int:
    from posttrain.core.config import build

    raw = {"input": a.input, "checkpoints": a.checkpoints, "max_tokens": a.max_tokens}
    if a.reference:
        raw["reference"] = a.reference
    if a.reward_model:
        raw["reward_model"] = a.reward_model
    if a.limit:
        raw["limit"] = a.limit
    if a.backend:
        raw["sampler"] = {"backend": a.backend}
    from posttrain.core import modelref

    cfg = build(EvalConfig, raw, "", "posttrain eval")
    if not Path(cfg.input).exists():
        raise FileNotFoundError(f"posttrain eval: --input: not found: {cfg.input}")
    for p in [*cfg.checkpoints, cfg.reference, cfg.reward_model]:
        why = modelref.check(p) if p else None
        if why:
            raise FileNotFoundError(f"posttrain eval: {why}")
    rows = evaluate(cfg, Path(a.out), resolve_model=modelref.resolve)
    print(format_table(rows))
    return 0


def add_cli(sub) -> None:
    """Register ``posttrain eval``."""
    e = sub.add_parser("eval", help="evaluate checkpoints on a held-out split (one row per checkpoint)")
    e.add_argument("--input", required=True, help="held-out prompt records (meta.answer / meta.verifiers)")
    e.add_argument("--checkpoints", nargs="+", required=True)
    e.add_argument("--reference", help="model for the KL estimate (e.g. the SFT model)")
    e.add_argument("--reward-model")
    e.add_argument("--out", required=True, help="folder for eval.jsonl and samples.jsonl")
    e.add_argument("--max-tokens", type=int, default=64)
    e.add_argument("--limit", type=int)
    e.add_argument("--backend", choices=["hf", "vllm", "openai"])
    e.set_defaults(fn=_cmd_eval)
