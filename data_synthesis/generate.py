"""Stage ``generate``: sample responses for a prompt set through the recipe's sampler.

Input: records with a ``prompt`` (or ``messages``, whose last assistant turn is
dropped), JSONL/Parquet/datasets. Output: ``OUT/records.jsonl`` demonstrations
(prompt + one sampled assistant turn per completion), each with ``meta``
holding the finish reason, token count and sampler backend; ``stats.json``.
Resumable: prompts whose records are already written are not sampled again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.core.config import key
from posttrain.core.inputs import InputSpec
from posttrain.core.records import RecordWriter, demonstration, iter_records, record_id, to_chat_prompt
from posttrain.core.sampling.base import SamplerConfig, SamplingParams


@dataclass
class GenerateConfig:
    """Keys of stage ``generate``."""

    input: InputSpec = key(doc="prompt records (prompt or messages; a last assistant turn is dropped)", input=True)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0, max_tokens=64))
    sampler: SamplerConfig | None = key(None, "default: the recipe's sampler section")
    model: str | None = key(None, "default: the recipe's model.path", model=True)
    limit: int | None = key(None, "use only the first N prompts")


def run(cfg: GenerateConfig, ctx) -> dict:
    """Entry point of stage kind ``generate``."""
    prompts = [to_chat_prompt(r) for r in ctx.read_input(cfg.input, None)]
    if cfg.limit is not None:
        prompts = prompts[: cfg.limit]
    out = ctx.out_dir / "records.jsonl"
    with RecordWriter(out, "demonstration") as w:
        todo = [p for p in prompts if not all(w.has(record_id("gen", p, j)) for j in range(cfg.sampling.n))]
        sampler = ctx.sampler(cfg.sampler, cfg.model) if todo else None
        bar = ctx.progress(total=len(prompts), initial=len(prompts) - len(todo))
        if todo:
            outs = sampler.generate(todo, cfg.sampling)
            for p, comps in zip(todo, outs):
                for j, c in enumerate(comps):
                    w.write(demonstration(p + [{"role": "assistant", "content": c.text}], id=record_id("gen", p, j),
                                          source=f"generate:{sampler.name}",
                                          meta={"finish_reason": c.finish_reason, "n_tokens": len(c.token_ids)}))
                bar.update(1)
        bar.close()
    rows = list(iter_records(out))
    stats = {"prompts": len(prompts), "records": len(rows),
             "terminated": sum(r["meta"].get("finish_reason") == "stop" for r in rows),
             "mean_tokens": sum(r["meta"].get("n_tokens", 0) for r in rows) / max(1, len(rows))}
    ctx.write_json("stats.json", stats)
    return stats
