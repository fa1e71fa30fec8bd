"""Recipes: one YAML file describing a run, loaded strictly, overridable, resumable.

Input: a YAML file with shared sections (``model``, ``tokenizer``, ``sampler``,
``output_dir``, ``seed``) and an ordered ``stages`` list; each stage has a
``kind`` (a key of the stage table the caller passes in: ``posttrain.stages.STAGES``
for the CLI), an optional ``name`` (default: the kind) and the keys of that kind's
config dataclass. ``key.path=value``
overrides (``stages[2].learning_rate=1e-5`` or ``stages.sft.learning_rate=...``)
are applied to the parsed YAML and validated the same way.

Paths: a value ``@NAME`` or ``@NAME/sub/path`` points into the output folder
of stage NAME (``OUTPUT_DIR/NAME``), which must come earlier in the list.
Other relative input paths are looked up from the working directory, then
from the recipe's folder; a missing input file is a validation error. Model
keys (``key(..., model=True)``) also take hub ids, resolved through the Hugging
Face cache (``posttrain.core.modelref``); one that cannot be resolved is a
validation error too.

Output: a ``Recipe`` whose ``run()`` executes the stages in order. Each stage
writes into ``OUTPUT_DIR/NAME`` and finishes by writing ``manifest.json``; on
re-run a stage with a manifest of the same fingerprint is skipped, so a killed
pipeline resumes. Under a distributed launch only rank 0 writes the manifest. A stage whose config changed since it finished is re-run
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
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal

import yaml

from posttrain.core import modelref
from posttrain.core.config import ConfigError, build, convert, key, check_size, load_yaml, parse_scalar, to_dict
from posttrain.core.devices import DTYPES
from posttrain.core.distributed import barrier, is_main_process
from posttrain.core.errors import BadInput
from posttrain.core.datafiles import is_hub_ref
from posttrain.core.inputs import check_source
from posttrain.core.sampling.base import SamplerConfig

StageTable = dict[str, tuple[type, Callable[[Any, Any], Any]]]

log = logging.getLogger("posttrain")


@dataclass
class ModelSection:
    """The policy model shared by stages that do not name their own."""

    path: str | None = key(None, "local folder, hub id (org/name) or @stage reference", model=True)
    base: str | None = key(None, "pre-trained base model (the merging optimizer's theta_base): folder or hub id",
                           model=True)
    dtype: Literal[DTYPES] = key("auto", "auto: bfloat16 on a bf16 GPU, float32 elsewhere")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = key(
        "sdpa", "attention back-end (trainers pick flash-attention varlen on GPUs when installed)")


@dataclass
class TokenizerSection:
    """Tokenizer; defaults to the model's folder."""

    path: str | None = key(None, "tokenizer folder or hub id (default: the model's folder)", model=True)
    chat_template: str | None = key(None, "a Jinja file that replaces the tokenizer's template everywhere "
                                    "(trainers, samplers, eval)", input=True)


@dataclass
class RecipeFile:
    """The top level of a recipe file."""

    output_dir: str = key(doc="every stage writes into output_dir/<stage name>/")
    stages: list[dict[str, Any]] = key(doc="the stages, in order: {kind, name?, ...the kind's keys}")
    model: ModelSection = key(factory=ModelSection, doc="the shared policy model")
    tokenizer: TokenizerSection = key(factory=TokenizerSection, doc="the shared tokenizer")
    sampler: SamplerConfig = key(factory=SamplerConfig, doc="the shared generation back-end")
    seed: int = key(0, "run seed (stage i uses seed + i)")
    description: str = key("", "free text (not part of the fingerprint)")


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

def kind_of(input_meta: Any, inherited: str | None = None) -> str | None:
    """The record kind an input field declares (``key(input="preference")``), or the enclosing one's."""
    return input_meta if isinstance(input_meta, str) else inherited


class Recipe:
    """A validated recipe: ``Recipe.load(path, stages, overrides)`` then ``run()``.

    ``stages`` is the stage table (kind -> (config class, entry function)); the composition
    root (``posttrain.stages``) passes it in, so this module never imports a stage.
    """

    def __init__(self, path: Path, file: RecipeFile, stages: list[StageSpec], raw: dict, table: StageTable):
        self.path = path
        self.file = file
        self.stages = stages
        self.raw = raw
        self.table = table
        self.output_dir = Path(file.output_dir)
        self._fingerprints: list[str] | None = None

    # -- construction
    @classmethod
    def load(cls, path: str | os.PathLike, stages: StageTable, overrides: list[str] | None = None,
             check_models: bool = True) -> "Recipe":
        """Read, override and validate a recipe; raise ConfigError with a one-line message."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: recipe file not found")
        raw_bytes = p.read_bytes()
        try:
            text = raw_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw_bytes[: e.start].count(b"\n") + 1
            raise ConfigError(f"{p}:{line}: not UTF-8 text (byte 0x{raw_bytes[e.start]:02x} at offset {e.start}); "
                              "save the recipe as UTF-8") from None
        data = load_yaml(text, str(p))
        check_size(data, str(p))
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the recipe must be a mapping with 'output_dir' and 'stages'")
        for o in overrides or []:
            apply_override(data, o, str(p))
        return cls.from_dict(data, p, stages, check_models)

    @classmethod
    def from_dict(cls, data: dict, path: Path, stages: StageTable, check_models: bool = True) -> "Recipe":
        """Validate a parsed recipe mapping (``path`` is used for messages and relative paths)."""
        src = str(path)
        raw = copy.deepcopy(data)
        top = build(RecipeFile, data, "", src)
        if not top.stages:
            raise ConfigError(f"{src}: stages: the recipe has no stages (give a list of stages, each with a 'kind')")
        specs: list[StageSpec] = []
        names: set[str] = set()
        for i, st in enumerate(top.stages):
            where = f"stages[{i}]"
            if not isinstance(st, dict):
                raise ConfigError(f"{src}: {where}: expected a mapping with 'kind', got {type(st).__name__}")
            st = dict(st)
            kind = st.pop("kind", None)
            if kind is None:
                raise ConfigError(f"{src}: {where}.kind: missing required key (expected one of: {', '.join(sorted(stages))})")
            if kind not in stages:
                raise ConfigError(f"{src}: {where}.kind: unknown stage kind {kind!r} (expected one of: {', '.join(sorted(stages))})")
            name = st.pop("name", kind)
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ConfigError(f"{src}: {where}.name: expected a name of letters, digits, '_', '-', '.', got {name!r}")
            if name in names:
                raise ConfigError(f"{src}: {where}.name: duplicate stage name {name!r} (give each stage a distinct 'name')")
            cfg_cls, _ = stages[kind]
            cfg = build(cfg_cls, st, where, src)
            spec = StageSpec(kind, name, i, cfg, raw["stages"][i])
            cls._check_refs(cfg, where, src, path.parent, names, check_models)
            names.add(name)
            specs.append(spec)
        cls._check_refs(top, "", src, path.parent, names, check_models, skip=("stages",))
        for spec in specs:  # checks that need the whole recipe (e.g. merging needs model.base)
            hook = getattr(spec.config, "check_in_recipe", None)
            if callable(hook):
                try:
                    hook(top)
                except ValueError as e:
                    raise ConfigError(f"{src}: stages[{spec.index}]: {e}") from None
        return cls(path, top, specs, raw, stages)

    @staticmethod
    def _check_refs(cfg: Any, where: str, src: str, recipe_dir: Path, earlier: set[str], check_models: bool,
                    skip: tuple[str, ...] = (), kind: str | None = None, data: Any = None) -> None:
        """Input files must exist, ``@refs`` must name earlier stages, model references must resolve.

        Inputs that declare a record kind are read and audited now with the stage's ``data`` checks
        (a mixture source with its split); ``hf://`` datasets are checked when the stage reads them.
        """
        data = getattr(cfg, "data", None) if data is None else data
        for f in dataclasses.fields(cfg):
            if f.name in skip:
                continue
            val = getattr(cfg, f.name)
            keypath = f"{where}.{f.name}" if where else f.name
            if dataclasses.is_dataclass(val):
                Recipe._check_refs(val, keypath, src, recipe_dir, earlier, check_models, data=data)
                continue
            if isinstance(val, list) and val and all(dataclasses.is_dataclass(v) for v in val):
                sub_kind = kind_of(f.metadata.get("input"), kind)  # mixture sources are read as the input's kind
                for j, v in enumerate(val):
                    Recipe._check_refs(v, f"{keypath}[{j}]", src, recipe_dir, earlier, check_models, kind=sub_kind,
                                       data=data)
                continue
            is_input, is_model = f.metadata.get("input"), f.metadata.get("model")
            if not (is_input or is_model) or val is None:
                continue
            for j, v in enumerate(val if isinstance(val, list) else [val]):
                k = f"{keypath}[{j}]" if isinstance(val, list) else keypath
                if dataclasses.is_dataclass(v):  # a mixture source: its path is checked as this input's kind
                    Recipe._check_refs(v, k, src, recipe_dir, earlier, check_models, kind=kind_of(is_input, kind),
                                       data=data)
                    continue
                if is_hub_ref(v):
                    continue
                if v.startswith("@"):
                    if v[1:].split("/")[0] not in earlier:
                        raise ConfigError(f"{src}: {k}: {v!r} must name an earlier stage (earlier: {', '.join(sorted(earlier)) or 'none'})")
                    continue
                local = Path(v) if Path(v).exists() else recipe_dir / v
                if is_model:
                    why = modelref.check(v) if (check_models and not local.exists()) else None
                    if why:
                        raise ConfigError(f"{src}: {k}: cannot resolve model reference: {why}")
                elif not local.exists():
                    raise ConfigError(f"{src}: {k}: input file not found: {v}")
                elif kind_of(is_input, kind) is not None:
                    try:  # the data a later stage reads is checked now, before earlier stages spend hours
                        check_source(str(local), kind_of(is_input, kind), cfg if hasattr(cfg, "split") else None,
                                     data)
                    except BadInput as e:
                        raise ConfigError(f"{src}: {k}: {e}") from None

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

    def resolve_model(self, value: str) -> str:
        """A model reference (``@stage``, folder, or hub id) as a local folder (hub ids via the HF cache)."""
        p = self.resolve(value)
        if value.startswith("@") or Path(p).exists():
            return p
        try:
            return modelref.resolve(p)
        except modelref.ModelRefError as e:
            raise ConfigError(f"{self.path}: {e}") from None

    def stage_dir(self, name: str) -> Path:
        """The output folder of stage ``name``."""
        return self.output_dir / name

    def resolved_dict(self) -> dict:
        """The recipe after overrides and defaults, as plain data."""
        d = to_dict(self.file)
        d["stages"] = [{"kind": s.kind, "name": s.name, **to_dict(s.config)} for s in self.stages]
        return d

    def fingerprint(self, upto: int) -> str:
        """Hash of the shared sections and stages 0..upto: a stage reruns when anything upstream changed.

        Computed once for all stages as a hash chain (stage i hashes stage i-1's fingerprint and its
        own config), so a recipe of n stages costs O(n), not O(n^2).
        """
        if self._fingerprints is None:
            d = self.resolved_dict()
            d.pop("description", None)
            stages = d.pop("stages")
            h = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()
            fps = []
            for st in stages:
                h = hashlib.sha256((h + json.dumps(st, sort_keys=True, default=str)).encode()).hexdigest()
                fps.append(h[:16])
            self._fingerprints = fps
        return self._fingerprints[upto]

    # -- running
    def check_launch(self, only: list[str] | None = None) -> None:
        """Checks of the launch (e.g. how many ranks), for the stages a run with ``only`` will start; ``run`` calls
        it before the first stage, so a stage that cannot run here fails before earlier stages spend hours."""
        for spec in self.stages:
            hook = getattr(spec.config, "check_before_run", None)
            if callable(hook) and not (only and spec.name not in only):
                try:
                    hook(self.file)
                except ValueError as e:
                    raise ConfigError(f"{self.path}: stages[{spec.index}]: {e}") from None

    def run(self, only: list[str] | None = None, force: bool = False, sampler: Any = None) -> dict[str, dict]:
        """Run the stages in order (skipping finished ones); return each stage's manifest.

        ``only`` limits the run to the named stages; ``force`` re-runs finished ones;
        ``sampler`` (any object with the Sampler protocol) replaces every stage's sampler.
        """
        from posttrain.core.provenance import provenance
        from posttrain.core.runtime import SamplerPool, StageContext

        unknown = [n for n in (only or []) if n not in {s.name for s in self.stages}]
        if unknown:
            raise ConfigError(f"{self.path}: --only: no stage named {unknown[0]!r} "
                              f"(stages: {', '.join(s.name for s in self.stages)})")
        self.check_launch(only)
        main = is_main_process()
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "recipe.resolved.yaml").write_text(
                yaml.safe_dump(self.resolved_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")
        results: dict[str, dict] = {}
        pool = SamplerPool(injected=sampler)
        todo = [s for s in self.stages if not (only and s.name not in only)]
        timings = RunTimings(self.output_dir / "timings.json")
        started = time.time()
        try:
            for i, spec in enumerate(todo, 1):
                out = self.stage_dir(spec.name)
                manifest = out / "manifest.json"
                fp = self.fingerprint(spec.index)
                done = self._finished(spec, out, manifest, fp, force, main)
                if done is not None:
                    results[spec.name] = done
                    continue
                out.mkdir(parents=True, exist_ok=True)
                log.info("stage %d/%d %s (%s): running; %s", i, len(todo), spec.name, spec.kind,
                         timings.eta([s.name for s in todo[i - 1:]], time.time() - started))
                ctx = StageContext(recipe=self, spec=spec, out_dir=out, samplers=pool)
                t0 = time.time()
                _, fn = self.table[spec.kind]
                summary = fn(spec.config, ctx) or {}
                m = {"kind": spec.kind, "name": spec.name, "fingerprint": fp,
                     "seconds": round(time.time() - t0, 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                     "summary": summary, "provenance": provenance(ctx.models_used)}
                if main:
                    tmp = manifest.with_suffix(".tmp")
                    tmp.write_text(json.dumps(m, indent=2, default=str))
                    os.replace(tmp, manifest)  # written last: its presence means the stage is complete
                    timings.record(spec.name, m["seconds"])
                barrier()  # no rank starts the next stage before the manifest (and the outputs) exist
                results[spec.name] = m
        finally:
            pool.close()
        return results

    def _finished(self, spec: StageSpec, out: Path, manifest: Path, fp: str, force: bool, main: bool) -> dict | None:
        """The manifest of a finished, unchanged stage (to skip it), else None after clearing the way."""
        if manifest.exists() and not force:
            m = json.loads(manifest.read_text())
            if m.get("fingerprint") == fp:
                log.info("stage %s (%s): complete, skipped", spec.name, spec.kind)
                return m
            barrier()  # every rank has read the old manifest before rank 0 moves the folder
            if main:
                aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
                log.warning("stage %s: config changed since it finished; old output moved to %s", spec.name, aside)
                out.rename(aside)
        elif manifest.exists():
            barrier()
            if main:
                manifest.unlink()
        barrier()
        return None


def _hms(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``42s``."""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class RunTimings:
    """Seconds each stage took when it last ran in this output folder (``OUT/timings.json``), for the ETA.

    Kept apart from the manifests because a stage whose config changed has its folder (and manifest)
    moved aside, and its last duration is still the best guess for the re-run.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            self.seconds: dict[str, float] = {k: float(v) for k, v in json.loads(path.read_text()).items()}
        except (OSError, ValueError, AttributeError, TypeError):
            self.seconds = {}  # first run here, or a torn file: no estimate

    def eta(self, remaining: list[str], elapsed: float) -> str:
        """``elapsed 3m05s, about 12m10s left`` from the previous run's timings of ``remaining`` (this stage on)."""
        known = [self.seconds[n] for n in remaining if n in self.seconds]
        if not known:
            return f"elapsed {_hms(elapsed)}"
        more = "" if len(known) == len(remaining) else f" + {len(remaining) - len(known)} stage(s) never timed"
        return f"elapsed {_hms(elapsed)}, about {_hms(sum(known))} left{more} (previous run's timings)"

    def record(self, name: str, seconds: float) -> None:
        """Store a finished stage's duration (atomic rewrite)."""
        self.seconds[name] = seconds
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.seconds, indent=1))
        os.replace(tmp, self.path)


def check_type(tp: Any, value: Any, key: str, source: str = "<config>") -> Any:
    """Validate a single value against a type (used by stages for dynamic keys)."""
    return convert(tp, value, key, source)
