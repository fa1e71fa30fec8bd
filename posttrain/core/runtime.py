"""What a running stage gets: paths, seed, the recipe's tokenizer, shared samplers, progress.

Input: the recipe, the stage spec and the stage's output folder. Output: ``StageContext``,
whose helpers every stage calls (``ctx.model_path``, ``ctx.tokenizer``, ``ctx.sampler``,
``ctx.resolve``, ``ctx.progress``, ``ctx.write_json``), and ``SamplerPool``, the samplers one
``Recipe.run`` shares across its stages (at most one vLLM engine alive at a time; an injected
sampler replaces them all). The recipe's ``tokenizer.chat_template`` file reaches every
tokenizer and sampler made here.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.core.sampling.base import Sampler, SamplerConfig, make_sampler

if TYPE_CHECKING:
    from posttrain.core.recipe import Recipe, StageSpec

log = logging.getLogger("posttrain")


class SamplerPool:
    """Samplers shared by the stages of one run, keyed by (config, model, tokenizer, template).

    ``injected``: a sampler (e.g. a ``ScriptedSampler`` in tests) that replaces every stage's
    sampler. ``release(backend)`` closes the engines of that backend (a stage that starts its
    own engine, like online DPO, frees the memory first).
    """

    def __init__(self, injected: Sampler | None = None):
        self.injected = injected
        self._cache: dict[str, Sampler] = {}

    def get(self, cfg: SamplerConfig, model: str, tokenizer: str | None, chat_template: str | None) -> Sampler:
        """The shared sampler for these settings (started on first use)."""
        if self.injected is not None:
            return self.injected
        k = json.dumps([asdict(cfg), model, tokenizer, chat_template], sort_keys=True, default=str)
        if k not in self._cache:
            if cfg.backend == "vllm":
                self.release("vllm")
            log.info("starting %s sampler on %s", cfg.backend, model)
            self._cache[k] = make_sampler(cfg, model=model, tokenizer=tokenizer, chat_template=chat_template)
        return self._cache[k]

    def release(self, backend: str) -> None:
        """Close every cached sampler of ``backend``."""
        for k in [k for k, s in self._cache.items() if s.name == backend]:
            self._cache.pop(k).close()

    def close(self) -> None:
        """Close every sampler the run started (never the injected one: its owner closes it)."""
        for s in self._cache.values():
            try:
                s.close()
            except Exception as e:  # noqa: BLE001 - closing must not hide the real error
                log.warning("closing sampler %s failed: %s", getattr(s, "name", s), e)
        self._cache.clear()


@dataclass
class StageContext:
    """Per-stage view of the run."""

    recipe: "Recipe"
    spec: "StageSpec"
    out_dir: Path
    samplers: SamplerPool = field(default_factory=SamplerPool)
    models_used: dict[str, str] = field(default_factory=dict)  # role -> resolved path, for the manifest
    input_stats: dict = field(default_factory=dict)  # what read_input read (rows per source), for the manifest

    @property
    def seed(self) -> int:
        """The recipe seed (stages offset it by their index so they do not repeat each other)."""
        return self.recipe.file.seed + self.spec.index

    @property
    def run_name(self) -> str:
        """``RUN-STAGE`` (RUN = the output folder's name): the HF Trainer's ``run_name`` (W&B runs are named per
        recipe run and grouped by stage instead: ``posttrain.core.tracking.run_identity``)."""
        return f"{Path(self.recipe.file.output_dir).name}-{self.spec.name}"

    def resolve(self, value: str | None) -> str | None:
        """Resolve an ``@stage/...`` reference or relative input path."""
        return self.recipe.resolve(value)

    def resolve_model(self, value: str | None, role: str = "model") -> str | None:
        """A model reference (``@stage``, local folder or hub id) as a local folder; recorded for the manifest."""
        if value is None:
            return None
        path = self.recipe.resolve_model(value)
        self.models_used[role] = path
        return path

    def model_path(self, override: str | None = None) -> str:
        """The stage's model (its own key if set, else the recipe's ``model.path``), as a local folder."""
        ref = override or self.recipe.file.model.path
        if not ref:
            raise ValueError(f"stage {self.spec.name}: no model (set model.path in the recipe or the stage's model key)")
        return self.resolve_model(ref, "model")

    def tokenizer_path(self, model: str | None = None) -> str:
        """The tokenizer folder: ``tokenizer.path`` or the model's folder."""
        tp = self.recipe.file.tokenizer.path
        return (self.resolve_model(tp, "tokenizer") if tp else None) or model or self.model_path()

    @property
    def chat_template(self) -> str | None:
        """The text of the recipe's ``tokenizer.chat_template`` file (None: use each tokenizer's own)."""
        f = self.recipe.file.tokenizer.chat_template
        return Path(self.resolve(f)).read_text(encoding="utf-8") if f else None

    def tokenizer(self, model: str | None = None) -> Any:
        """The stage tokenizer (``tokenizer_path``), with the recipe's chat template applied when set."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.tokenizer_path(model))
        tmpl = self.chat_template
        if tmpl:
            tok.chat_template = tmpl
        return tok

    def sampler(self, cfg: SamplerConfig | None = None, model: str | None = None) -> Sampler:
        """A sampler for ``model`` (default: the recipe's), shared across stages while the settings match."""
        if self.samplers.injected is not None:
            return self.samplers.injected
        cfg = cfg or self.recipe.file.sampler
        model_dir = self.resolve_model(cfg.model, "sampler") if cfg.model else self.model_path(model)
        tok = (self.resolve_model(cfg.tokenizer, "sampler_tokenizer") if cfg.tokenizer else None) \
            or self.tokenizer_path(model_dir)
        return self.samplers.get(cfg, model_dir, tok, self.chat_template)

    def read_input(self, spec: Any, kind: str | None, limit: int | None = None) -> list[dict]:
        """The records of a stage's ``input`` (a path or a mixture), normalised to ``kind``.

        The read stats (rows per source, realised mixture counts) are kept in ``input_stats``.
        """
        from posttrain.core.inputs import read_input

        data = getattr(self.spec.config, "data", None)  # the stage's `data:` section, where it has one
        recs, stats = read_input(spec, kind, self.resolve, self.seed, limit, data)
        self.input_stats = stats
        return recs

    def rng(self) -> random.Random:
        """A random generator seeded for this stage."""
        return random.Random(self.seed)

    def progress(self, total: int | None = None, desc: str | None = None, **kw: Any) -> Any:
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
