"""What a running stage gets: its config's context (paths, seed, shared sampler, progress).

Input: the recipe, the stage spec and the stage's output folder. Output: helpers
that stages call (``ctx.sampler(...)``, ``ctx.resolve(...)``, ``ctx.progress(...)``),
and ``close_shared`` which the runner calls once at the end to release engines.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.sampling.base import Sampler, SamplerConfig, make_sampler

if TYPE_CHECKING:
    from posttrain.recipe import Recipe, StageSpec

log = logging.getLogger("posttrain")


@dataclass
class StageContext:
    """Per-stage view of the run. ``shared`` lives across the stages of one ``Recipe.run``."""

    recipe: "Recipe"
    spec: "StageSpec"
    out_dir: Path
    shared: dict = field(default_factory=dict)

    @property
    def seed(self) -> int:
        """The recipe seed (stages offset it by their index so they do not repeat each other)."""
        return self.recipe.file.seed + self.spec.index

    def resolve(self, value: str | None) -> str | None:
        """Resolve an ``@stage/...`` reference or relative input path."""
        return self.recipe.resolve(value)

    def model_path(self, override: str | None = None) -> str:
        """The stage's model (its own key if set, else the recipe's ``model.path``)."""
        p = self.resolve(override or self.recipe.file.model.path)
        if not p:
            raise ValueError(f"stage {self.spec.name}: no model (set model.path in the recipe or the stage's model key)")
        return p

    def tokenizer_path(self, model: str | None = None) -> str:
        """The tokenizer folder: ``tokenizer.path`` or the model's folder."""
        return self.resolve(self.recipe.file.tokenizer.path) or model or self.model_path()

    def sampler(self, cfg: SamplerConfig | None = None, model: str | None = None) -> Sampler:
        """A sampler for ``model`` (default: the recipe's), shared across stages while the key matches.

        At most one vLLM engine is kept alive: asking for another closes the previous one.
        """
        if "sampler_override" in self.shared:
            return self.shared["sampler_override"]
        cfg = cfg or self.recipe.file.sampler
        model = self.resolve(cfg.model) if cfg.model else self.model_path(model)
        key = json.dumps([asdict(cfg), model], sort_keys=True, default=str)
        cache: dict[str, Sampler] = self.shared.setdefault("samplers", {})
        if key not in cache:
            if cfg.backend == "vllm":
                for k in [k for k, s in cache.items() if s.name == "vllm"]:
                    cache.pop(k).close()
            tok = self.resolve(cfg.tokenizer) or self.resolve(self.recipe.file.tokenizer.path) or model
            log.info("stage %s: starting %s sampler on %s", self.spec.name, cfg.backend, model)
            cache[key] = make_sampler(cfg, model=model, tokenizer=tok)
        return cache[key]

    def rng(self) -> random.Random:
        """A random generator seeded for this stage."""
        return random.Random(self.seed)

    def progress(self, total: int | None = None, desc: str | None = None, **kw: Any):
        """A tqdm progress bar labelled with the stage name."""
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc or self.spec.name, dynamic_ncols=True, **kw)

    def write_json(self, name: str, data: Any) -> Path:
        """Write a JSON report into the stage folder (atomically)."""
        p = self.out_dir / name
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
        tmp.replace(p)
        return p


def close_shared(shared: dict) -> None:
    """Close every sampler the run started."""
    for s in shared.pop("samplers", {}).values():
        try:
            s.close()
        except Exception as e:  # noqa: BLE001 - closing must not hide the real error
            log.warning("closing sampler %s failed: %s", getattr(s, "name", s), e)
