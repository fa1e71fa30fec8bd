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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.recipe import input_field
from posttrain.records import iter_records, to_chat_prompt
from posttrain.sampling.base import SamplerConfig, SamplingParams, make_sampler


@dataclass
class EvalConfig:
    """Keys of stage ``eval``."""

    input: str = input_field()  # held-out prompt records
    checkpoints: list[str] = input_field()  # model folders / @stage refs, one result row each
    labels: list[str] | None = None  # row labels (default: the stage name of each @ref, or the folder name)
    reference: str | None = input_field(None)  # model for the KL estimate (e.g. the SFT model); none: no KL
    reward_model: str | None = input_field(None)  # reward model folder for the mean score; none: skipped
    max_tokens: int = 64
    kl_samples: int = 1  # sampled responses per prompt for the KL estimate
    samples_kept: int = 4  # greedy responses per checkpoint kept in samples.jsonl
    limit: int | None = None  # evaluate on the first N records only
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # generation backend (hf by default)
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


def is_math_correct(text: str, reference: Any) -> bool:
    """Final-answer check: the synthesis verifier when installed, else the demo task's own check."""
    try:
        from data_synthesis.math_verify import is_correct
    except ImportError:
        from posttrain.tasks import answer_ok

        return answer_ok(text, reference)
    return bool(is_correct(text, str(reference)))


def if_pass_rate(sources: list[str], response: str) -> float:
    """Mean verdict of instruction-following verifiers run in the sandbox."""
    from data_synthesis.if_feedback import evaluate_response

    return float(evaluate_response(sources, response))


def response_logprobs(model, tokenizer, prompts: list[list[dict]], responses: list[list[int]], batch: int = 16) -> list[float]:
    """Sum of log p(response tokens | prompt) under ``model`` for each pair (right-padded batches)."""
    import torch

    out: list[float] = []
    dev = next(model.parameters()).device
    for s in range(0, len(prompts), batch):
        seqs, starts = [], []
        for p, r in zip(prompts[s:s + batch], responses[s:s + batch]):
            ids = list(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
            starts.append(len(ids))
            seqs.append(ids + list(r))
        width = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, x in enumerate(seqs):
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:].to(dev).unsqueeze(-1)).squeeze(-1)
        for i, x in enumerate(seqs):
            out.append(float(lp[i, starts[i] - 1: len(x) - 1].sum()))
    return out


def evaluate_checkpoint(path: str, records: list[dict], cfg: EvalConfig, reference: str | None,
                        reward_model: str | None, sampler: Any = None) -> tuple[dict, list[dict]]:
    """Evaluate one model folder; return its result row and sample responses.

    ``sampler`` replaces the checkpoint's own sampler (tests, or a caller that serves the model itself).
    """
    import torch

    prompts = [to_chat_prompt(r) for r in records]
    own = sampler is None
    sampler = make_sampler(cfg.sampler, model=path, tokenizer=path) if own else sampler
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
        row["accuracy"] = sum(is_math_correct(t, a) for t, a in math_items) / len(math_items)
        from posttrain.tasks import format_ok

        row["format_rate"] = sum(format_ok(t) for t, _ in math_items) / len(math_items)
    if_items = [(t, r["meta"]["verifiers"]) for t, r in zip(texts, records) if r.get("meta", {}).get("verifiers")]
    if if_items:
        row["if_pass_rate"] = sum(if_pass_rate(v, t) for t, v in if_items) / len(if_items)
    code_items = [(t, r["meta"]["tests"]) for t, r in zip(texts, records) if r.get("meta", {}).get("tests")]
    if code_items:
        from data_synthesis.code_feedback import code_pass_rate

        rates = [code_pass_rate(t, tests) for t, tests in code_items]
        row["code_pass_rate"] = sum(rates) / len(rates)
        row["code_solved"] = sum(r == 1.0 for r in rates) / len(rates)
    if reward_model:
        from reward.scorer import RewardScorer

        scorer = RewardScorer(reward_model)
        try:
            row["reward_mean"] = sum(scorer.score(prompts, texts)) / max(1, len(texts))
        finally:
            scorer.close()
    if reference and sampled is not None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        flat_p = [p for p, cs in zip(prompts, sampled) for _ in cs]
        flat_r = [c.token_ids for cs in sampled for c in cs]
        lps = {}
        for name, mpath in (("policy", path), ("ref", reference)):
            m = AutoModelForCausalLM.from_pretrained(mpath, dtype=torch.float32).eval()
            lps[name] = response_logprobs(m, tok, flat_p, flat_r)
            del m
        row["kl_to_ref"] = sum(a - b for a, b in zip(lps["policy"], lps["ref"])) / max(1, len(flat_r))
    samples = [{"prompt": p[-1]["content"], "response": t, "answer": r.get("meta", {}).get("answer")}
               for p, t, r in list(zip(prompts, texts, records))[: cfg.samples_kept]]
    return row, samples


def evaluate(cfg: EvalConfig, out_dir: Path, resolve=lambda x: x, sampler: Any = None) -> list[dict]:
    """Evaluate every checkpoint (skipping ones already in ``out_dir/eval.jsonl``); return all rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records = list(iter_records(resolve(cfg.input), "prompt"))
    if cfg.limit is not None:
        records = records[: cfg.limit]
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
        row, samples = evaluate_checkpoint(resolve(ckpt), records, cfg, resolve(cfg.reference),
                                           resolve(cfg.reward_model), sampler)
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


def run(cfg: EvalConfig, ctx) -> dict:
    """Entry point of stage kind ``eval``."""
    rows = evaluate(cfg, ctx.out_dir, ctx.resolve, ctx.shared.get("sampler_override"))
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
    from posttrain.config import build

    raw = {"input": a.input, "checkpoints": a.checkpoints, "max_tokens": a.max_tokens}
    if a.reference:
        raw["reference"] = a.reference
    if a.reward_model:
        raw["reward_model"] = a.reward_model
    if a.limit:
        raw["limit"] = a.limit
    if a.backend:
        raw["sampler"] = {"backend": a.backend}
    cfg = build(EvalConfig, raw, "", "posttrain eval")
    for p in [cfg.input, *cfg.checkpoints]:
        if not Path(p).exists():
            raise FileNotFoundError(f"posttrain eval: not found: {p}")
    rows = evaluate(cfg, Path(a.out))
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
