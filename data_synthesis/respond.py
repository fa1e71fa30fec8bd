"""Stage ``respond``: several responses per instruction from one or more samplers / sampling settings.

Input: instruction records (e.g. stage ``evolve``'s ``records.jsonl``); the
prompt of each record is sent as is (system turns kept).

Method: each entry of ``generators`` (a label, an optional sampler section
and model, and sampling settings with ``n`` responses) is run over all
instructions, ``chunk_size`` prompts per sampler call, each chunk cached per
instruction in ``steps/gen-LABEL.jsonl`` (a killed run re-sends only what is
missing); generators run one after another, so at most one vLLM engine is
alive at a time. Exact duplicate responses within an instruction are dropped
when ``dedupe`` is set. Fewer than ``min_success_rate`` non-empty responses stop
the stage before it writes anything.

Outputs:

* ``tasks.jsonl``: the annotation tasks, written whole when all generators are done.
  One record per instruction::

      {"id": INSTRUCTION_ID, "prompt": [messages...], "source": "respond",
       "meta": {...instruction meta...},
       "responses": [{"id": RESPONSE_ID, "text": "...", "label": GENERATOR_LABEL,
                      "sampler": BACKEND, "model": MODEL_PATH_OR_NULL,
                      "sampling": {temperature, top_p, max_tokens},
                      "finish_reason": "stop" | "length", "n_tokens": N}, ...]}

  This is the TASKS file that ``posttrain annotate serve`` loads.
* ``stats.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from data_synthesis.common import (CHUNK_DOC, DEFAULT_CHUNK_SIZE, FLOOR_DOC, check_success, lazy_sampler,
                                   load_instructions, safe_step_name, sample_step, sampler_name, step_path)
from posttrain.core.config import key
from posttrain.core.inputs import InputSpec
from posttrain.core.records import record_id, write_records
from posttrain.core.sampling.base import SamplerConfig, SamplingParams


@dataclass
class Generator:
    """One source of responses: a sampler (and model) with its sampling settings."""

    label: str = key(doc="name shown in the records (e.g. \"policy-t0.7\", \"sft-greedy\")")
    sampler: SamplerConfig | None = key(None, "default: the recipe's sampler section")
    model: str | None = key(None, "default: the recipe's model.path", model=True)
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(n=2, temperature=0.8, max_tokens=256))


@dataclass
class RespondConfig:
    """Keys of stage ``respond`` (multi-response generation for annotation)."""

    input: InputSpec = key(doc="instruction records (e.g. @evolve)", input=True)
    generators: list[Generator] = field(default_factory=lambda: [
        Generator(label="t0.7", sampling=SamplingParams(n=2, temperature=0.7, max_tokens=256)),
        Generator(label="t1.0", sampling=SamplingParams(n=2, temperature=1.0, max_tokens=256))])
    dedupe: bool = key(True, "drop exact duplicate responses of one instruction")
    min_responses: int = key(2, "instructions left with fewer responses are not written to tasks.jsonl")
    limit: int | None = key(None, "use only the first N instructions")
    chunk_size: int = key(DEFAULT_CHUNK_SIZE, CHUNK_DOC)
    min_success_rate: float = key(0.05, FLOOR_DOC + " (usable: a non-empty response)")

    def check(self) -> None:
        """Cross-field checks."""
        labels = [g.label for g in self.generators]
        if not labels:
            raise ValueError("generators: need at least one generator")
        if len(set(labels)) != len(labels):
            raise ValueError(f"generators: labels must be distinct, got {labels}")
        if self.min_responses < 1 or self.chunk_size < 1 or not 0 <= self.min_success_rate <= 1:
            raise ValueError("min_responses and chunk_size must be >= 1, min_success_rate in [0, 1]")


def build_tasks(instructions: list[dict], by_generator: dict[tuple[str, str], list[dict]], labels: list[str],
                dedupe: bool = True, min_responses: int = 2) -> tuple[list[dict], int]:
    """Assemble annotation tasks from per-(instruction id, label) response lists.

    Returns the tasks (instruction order, generator order within) and how many
    instructions were skipped for having fewer than ``min_responses`` responses.
    """
    tasks, skipped = [], 0
    for ins in instructions:
        responses, seen = [], set()
        for label in labels:
            for resp in by_generator.get((ins["id"], label), []):
                key = resp["text"].strip()
                if dedupe and key in seen:
                    continue
                seen.add(key)
                responses.append(resp)
        if len(responses) < min_responses:
            skipped += 1
            continue
        tasks.append({"id": ins["id"], "prompt": ins["prompt"], "source": "respond", "meta": ins["meta"],
                      "responses": responses})
    return tasks, skipped


def run(cfg: RespondConfig, ctx) -> dict:
    """Entry point of stage kind ``respond``."""
    instructions = load_instructions(ctx.read_input(cfg.input, None), cfg.limit)
    by_gen: dict[tuple[str, str], list[dict]] = {}
    caches = []
    for g in cfg.generators:
        step = "gen-" + safe_step_name(g.label)
        caches.append(step_path(ctx, step))
        outs = sample_step(ctx, lazy_sampler(ctx, g.sampler, g.model), step,
                           {ins["id"]: ins["prompt"] for ins in instructions}, g.sampling, cfg.chunk_size)
        backend = sampler_name(ctx, g.sampler)
        model = g.model or (g.sampler.model if g.sampler else None) or ctx.recipe.file.model.path
        for ins in instructions:
            rid = record_id("respond", ins["id"], g.label)
            by_gen[(ins["id"], g.label)] = [
                {"id": record_id(rid, j), "text": c["text"], "label": g.label, "sampler": backend, "model": model,
                 "sampling": {"temperature": g.sampling.temperature, "top_p": g.sampling.top_p,
                              "max_tokens": g.sampling.max_tokens},
                 "finish_reason": c["finish"], "n_tokens": c["n_tokens"]} for j, c in enumerate(outs[ins["id"]])]
    resp = [r for v in by_gen.values() for r in v]
    check_success(ctx.spec.name, "responses non-empty", sum(bool(r["text"].strip()) for r in resp), len(resp),
                  cfg.min_success_rate, caches)
    labels = [g.label for g in cfg.generators]
    tasks, skipped = build_tasks(instructions, by_gen, labels, cfg.dedupe, cfg.min_responses)
    write_records(ctx.out_dir / "tasks.jsonl", tasks, "prompt")
    n_resp = [len(t["responses"]) for t in tasks]
    stats = {"instructions": len(instructions), "tasks": len(tasks), "skipped_too_few": skipped,
             "responses": sum(n_resp), "per_generator": {lab: sum(1 for t in tasks for r in t["responses"]
                                                                 if r["label"] == lab) for lab in labels},
             "truncated": sum(1 for t in tasks for r in t["responses"] if r["finish_reason"] == "length")}
    ctx.write_json("stats.json", stats)
    return stats
