"""Stage ``generate``: sample responses for a prompt set through the recipe's sampler.

Input: records with a ``prompt`` (or ``messages``, whose last assistant turn is
dropped), JSONL/Parquet/datasets. Output: ``OUT/records.jsonl`` demonstrations
(prompt + one sampled assistant turn per completion), each with ``meta``
holding the finish reason, token count and sampler backend; ``stats.json``.
Resumable: prompts are sampled ``chunk_size`` at a time and cached per input
record in ``steps/samples.jsonl`` (seeded per record), so a killed run re-sends
only what is missing; records are written whole at the end, unless fewer than
``min_success_rate`` of the completions are non-empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from data_synthesis.common import (CHUNK_DOC, DEFAULT_CHUNK_SIZE, FLOOR_DOC, check_success, lazy_sampler, sample_step,
                                   sampler_name, step_path)
from posttrain.core.config import key
from posttrain.core.inputs import InputSpec
from posttrain.core.records import demonstration, record_id, to_chat_prompt, write_records
from posttrain.core.sampling.base import SamplerConfig, SamplingParams


@dataclass
class GenerateConfig:
    """Keys of stage ``generate``."""

    input: InputSpec = key(doc="prompt records (prompt or messages; a last assistant turn is dropped)", input=True)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0, max_tokens=64))
    sampler: SamplerConfig | None = key(None, "default: the recipe's sampler section")
    model: str | None = key(None, "default: the recipe's model.path", model=True)
    limit: int | None = key(None, "use only the first N prompts")
    chunk_size: int = key(DEFAULT_CHUNK_SIZE, CHUNK_DOC)
    min_success_rate: float = key(0.05, FLOOR_DOC + " (usable: a non-empty completion)")

    def check(self) -> None:
        """Range checks."""
        if self.chunk_size < 1 or not 0 <= self.min_success_rate <= 1:
            raise ValueError("chunk_size must be >= 1 and min_success_rate in [0, 1]")


def run(cfg: GenerateConfig, ctx) -> dict:
    """Entry point of stage kind ``generate``."""
    jobs: dict[str, list[dict]] = {}
    for r in ctx.read_input(cfg.input, None):
        jobs.setdefault(str(r["id"]), to_chat_prompt(r))  # a repeated id is one prompt
    if cfg.limit is not None:
        jobs = dict(list(jobs.items())[: cfg.limit])
    outs = sample_step(ctx, lazy_sampler(ctx, cfg.sampler, cfg.model), "samples", jobs, cfg.sampling, cfg.chunk_size)
    comps = [c for v in outs.values() for c in v]
    check_success(ctx.spec.name, "completions non-empty", sum(bool(c["text"].strip()) for c in comps), len(comps),
                  cfg.min_success_rate, [step_path(ctx, "samples")])
    source = f"generate:{sampler_name(ctx, cfg.sampler)}"
    rows = [demonstration(p + [{"role": "assistant", "content": c["text"]}], id=record_id("gen", rid, j), source=source,
                          meta={"prompt_id": rid, "finish_reason": c["finish"], "n_tokens": c["n_tokens"]})
            for rid, p in jobs.items() for j, c in enumerate(outs[rid])]
    write_records(ctx.out_dir / "records.jsonl", rows, "demonstration")
    stats = {"prompts": len(jobs), "records": len(rows),
             "terminated": sum(r["meta"]["finish_reason"] == "stop" for r in rows),
             "mean_tokens": sum(r["meta"]["n_tokens"] for r in rows) / max(1, len(rows))}
    ctx.write_json("stats.json", stats)
    return stats
