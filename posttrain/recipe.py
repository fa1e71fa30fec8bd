"""Recipes: one YAML file describing a run, loaded strictly, overridable, resumable.

Input: a YAML file with shared sections (``model``, ``tokenizer``, ``sampler``,
``output_dir``, ``seed``) and an ordered ``stages`` list; each stage has a
``kind`` (see ``posttrain.stages.STAGES``), an optional ``name`` (default: the
kind) and the keys of that kind's config dataclass. ``key.path=value``
overrides (``stages[2].learning_rate=1e-5`` or ``stages.sft.learning_rate=...``)
are applied to the parsed YAML and validated the same way.

Paths: a value ``@NAME`` or ``@NAME/sub/path`` points into the output folder
of stage NAME (``OUTPUT_DIR/NAME``), which must come earlier in the list.
Other relative input paths are looked up from the working directory, then
from the recipe's folder; a missing input file is a validation error.

Output: a ``Recipe`` whose ``run()`` executes the stages in order. Each stage
writes into ``OUTPUT_DIR/NAME`` and finishes by writing ``manifest.json``; on
re-run a stage with a manifest of the same fingerprint is skipped, so a killed
pipeline resumes. A stage whose config changed since it finished is re-run
after its old folder is moved aside (never deleted). The resolved recipe is
written to ``OUTPUT_DIR/recipe.resolved.yaml``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from posttrain.config import ConfigError, build, convert, load_yaml, parse_scalar, to_dict
from posttrain.sampling.base import SamplerConfig

log = logging.getLogger("posttrain")

# Declares a config field as an input file: validation checks that it exists.
INPUT = {"input": True}


def input_field(default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field holding an input path (or ``@stage`` reference) checked at load time."""
    if default is dataclasses.MISSING:
        return field(metadata=INPUT)
    return field(default=default, metadata=INPUT)


@dataclass
class ModelSection:
    """The policy model shared by stages that do not name their own."""

    path: str | None = None  # HF folder, hub id, or @stage reference
    base: str | None = None  # pre-trained base model (the merging optimizer's theta_base)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = "sdpa"


@dataclass
class TokenizerSection:
    """Tokenizer; defaults to the model's folder."""

    path: str | None = None
    chat_template: str | None = None  # a Jinja file that replaces the tokenizer's template


@dataclass
class RecipeFile:
    """The top level of a recipe file."""

    output_dir: str
    stages: list[dict[str, Any]]
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    seed: int = 0
    description: str = ""


@dataclass
class StageSpec:
    """One resolved stage: its kind, name, position, typed config and raw dict."""

    kind: str
    name: str
    index: int
    config: Any
    raw: dict


# ---------------------------------------------------------------- overrides

_SEG = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _split_path(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for m in _SEG.finditer(path):
        parts.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
    return parts


def apply_override(data: dict, override: str, source: str) -> None:
    """Apply one ``key.path=value`` override to the parsed recipe ``data`` in place."""
    if "=" not in override:
        raise ConfigError(f"{source}: override {override!r}: expected KEY.PATH=VALUE")
    key, _, text = override.partition("=")
    parts = _split_path(key.strip())
    if not parts:
        raise ConfigError(f"{source}: override {override!r}: empty key")
    value = parse_scalar(text)
    node: Any = data
    walked = ""
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list) and isinstance(part, str):
            # stages.NAME: find the stage by name (or kind when unnamed)
            match = [s for s in node if isinstance(s, dict) and s.get("name", s.get("kind")) == part]
            if not match:
                raise ConfigError(f"{source}: override {key}: no stage named {part!r}")
            node = match[0]
        elif isinstance(node, list):
            if part >= len(node):
                raise ConfigError(f"{source}: override {key}: {walked} has {len(node)} items, no [{part}]")
            node = node[part]
        else:
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        walked += f"[{part}]" if isinstance(part, int) else (f".{part}" if walked else part)
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"{source}: override {key}: {walked} is a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or last >= len(node):
            raise ConfigError(f"{source}: override {key}: bad index {last!r}")
    node[last] = value


# ---------------------------------------------------------------- loading

def _stage_registry() -> dict[str, tuple[type, Any]]:
    from posttrain.stages import STAGES

    return STAGES


class Recipe:
    """A validated recipe; ``Recipe.load(path, overrides)`` then ``run()``."""

    def __init__(self, path: Path, file: RecipeFile, stages: list[StageSpec], raw: dict):
        self.path = path
        self.file = file
        self.stages = stages
        self.raw = raw
        self.output_dir = Path(file.output_dir)

    # -- construction
    @classmethod
    def load(cls, path: str | os.PathLike, overrides: list[str] | None = None) -> "Recipe":
        """Read, override and validate a recipe; raise ConfigError with a one-line message."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: recipe file not found")
        data = load_yaml(p.read_text(encoding="utf-8"), str(p))
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the recipe must be a mapping with 'output_dir' and 'stages'")
        for o in overrides or []:
            apply_override(data, o, str(p))
        return cls.from_dict(data, p)

    @classmethod
    def from_dict(cls, data: dict, path: Path) -> "Recipe":
        """Validate a parsed recipe mapping (``path`` is used for messages and relative paths)."""
        src = str(path)
        raw = copy.deepcopy(data)
        top = build(RecipeFile, data, "", src)
        registry = _stage_registry()
        specs: list[StageSpec] = []
        names: set[str] = set()
        for i, st in enumerate(top.stages):
            where = f"stages[{i}]"
            st = dict(st)
            kind = st.pop("kind", None)
            if kind is None:
                raise ConfigError(f"{src}: {where}.kind: missing required key (expected one of: {', '.join(sorted(registry))})")
            if kind not in registry:
                raise ConfigError(f"{src}: {where}.kind: unknown stage kind {kind!r} (expected one of: {', '.join(sorted(registry))})")
            name = st.pop("name", kind)
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ConfigError(f"{src}: {where}.name: expected a name of letters, digits, '_', '-', '.', got {name!r}")
            if name in names:
                raise ConfigError(f"{src}: {where}.name: duplicate stage name {name!r} (give each stage a distinct 'name')")
            cfg_cls, _ = registry[kind]
            cfg = build(cfg_cls, st, where, src)
            spec = StageSpec(kind, name, i, cfg, raw["stages"][i])
            cls._check_inputs(cfg, where, src, path.parent, names)
            names.add(name)
            specs.append(spec)
        all_names = names
        for section in ("model", "tokenizer"):
            val = getattr(top, section).path
            if isinstance(val, str) and val.startswith("@") and val[1:].split("/")[0] not in all_names:
                raise ConfigError(f"{src}: {section}.path: {val!r} names no stage of this recipe")
        return cls(path, top, specs, raw)

    @staticmethod
    def _check_inputs(cfg: Any, where: str, src: str, recipe_dir: Path, earlier: set[str]) -> None:
        for f in dataclasses.fields(cfg):
            val = getattr(cfg, f.name)
            key = f"{where}.{f.name}"
            if dataclasses.is_dataclass(val):
                Recipe._check_inputs(val, key, src, recipe_dir, earlier)
                continue
            if not f.metadata.get("input") or val is None:
                continue
            for j, v in enumerate(val if isinstance(val, list) else [val]):
                k = f"{key}[{j}]" if isinstance(val, list) else key
                if v.startswith("@"):
                    if v[1:].split("/")[0] not in earlier:
                        raise ConfigError(f"{src}: {k}: {v!r} must name an earlier stage (earlier: {', '.join(sorted(earlier)) or 'none'})")
                elif not (Path(v).exists() or (recipe_dir / v).exists()):
                    raise ConfigError(f"{src}: {k}: input file not found: {v}")

    # -- paths
    def resolve(self, value: str | None) -> str | None:
        """Turn an ``@stage/...`` reference or relative input path into a usable path."""
        if value is None:
            return None
        if value.startswith("@"):
            return str(self.output_dir / value[1:])
        if not Path(value).exists() and (self.path.parent / value).exists():
            return str(self.path.parent / value)
        return value

    def stage_dir(self, name: str) -> Path:
        """The output folder of stage ``name``."""
        return self.output_dir / name

    def resolved_dict(self) -> dict:
        """The recipe after overrides and defaults, as plain data."""
        d = to_dict(self.file)
        d["stages"] = [{"kind": s.kind, "name": s.name, **to_dict(s.config)} for s in self.stages]
        return d

    def fingerprint(self, upto: int) -> str:
        """Hash of the shared sections and stages 0..upto: a stage reruns when anything upstream changed."""
        d = self.resolved_dict()
        d.pop("description", None)
        d["stages"] = d["stages"][: upto + 1]
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # -- running
    def run(self, only: list[str] | None = None, force: bool = False, sampler: Any = None) -> dict[str, dict]:
        """Run the stages in order (skipping finished ones); return each stage's manifest.

        ``only`` limits the run to the named stages; ``force`` re-runs finished ones;
        ``sampler`` (any object with the Sampler protocol) replaces every stage's sampler.
        """
        from posttrain.runtime import StageContext

        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "recipe.resolved.yaml").write_text(
            yaml.safe_dump(self.resolved_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")
        registry = _stage_registry()
        results: dict[str, dict] = {}
        ctx_shared: dict = {} if sampler is None else {"sampler_override": sampler}
        try:
            for spec in self.stages:
                if only and spec.name not in only:
                    continue
                out = self.stage_dir(spec.name)
                manifest = out / "manifest.json"
                fp = self.fingerprint(spec.index)
                if manifest.exists() and not force:
                    m = json.loads(manifest.read_text())
                    if m.get("fingerprint") == fp:
                        log.info("stage %s (%s): complete, skipped", spec.name, spec.kind)
                        results[spec.name] = m
                        continue
                    aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
                    log.warning("stage %s: config changed since it finished; old output moved to %s", spec.name, aside)
                    out.rename(aside)
                elif manifest.exists():
                    manifest.unlink()
                out.mkdir(parents=True, exist_ok=True)
                log.info("stage %s (%s): running", spec.name, spec.kind)
                ctx = StageContext(recipe=self, spec=spec, out_dir=out, shared=ctx_shared)
                t0 = time.time()
                _, fn = registry[spec.kind]
                summary = fn(spec.config, ctx) or {}
                m = {"kind": spec.kind, "name": spec.name, "fingerprint": fp,
                     "seconds": round(time.time() - t0, 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                     "summary": summary}
                tmp = manifest.with_suffix(".tmp")
                tmp.write_text(json.dumps(m, indent=2, default=str))
                os.replace(tmp, manifest)  # written last: its presence means the stage is complete
                results[spec.name] = m
        finally:
            from posttrain.runtime import close_shared

            close_shared(ctx_shared)
        return results


def check_type(tp: Any, value: Any, key: str, source: str = "<config>") -> Any:
    """Validate a single value against a type (used by stages for dynamic keys)."""
    return convert(tp, value, key, source)
