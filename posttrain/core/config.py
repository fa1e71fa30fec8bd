"""Strict typed configs: build dataclasses from plain dicts, with errors that name the key.

Input: a dataclass type and a mapping (parsed YAML). Output: an instance, or a
``ConfigError`` whose message is one line: ``FILE: KEY.PATH: what was expected``.
Supported field types: bool, int, float, str, Literal[...], Optional[X],
list[X], dict[str, X], nested dataclasses, and ``Any``. Unknown keys, missing
required keys and wrong types are all errors; ints are accepted for floats,
nothing else is coerced. Defaults live on the dataclass fields only.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from posttrain.core.errors import ConfigError

__all__ = ["ConfigError", "MAX_VALUES", "build", "check_size", "convert", "field_doc", "key", "load_yaml", "parse_scalar", "to_dict", "type_name"]


def key(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Callable[[], Any] | None = None,
        input: bool | str = False, model: bool = False) -> Any:
    """A documented config field: ``name: T = key(DEFAULT, "what it does")``.

    ``factory`` builds mutable defaults (lists, dicts, sections); ``input=True`` marks a file path
    (or ``@stage`` reference) that validation checks exists, ``input="preference"`` (a record kind)
    one whose records validation also reads and audits as that kind; ``model=True`` a model reference
    (folder, hub id or ``@stage``) that validation checks can be resolved. The doc string is
    what ``posttrain keys`` prints for the key.
    """
    meta: dict[str, Any] = {"doc": doc}
    if input:
        meta["input"] = input  # True, or the record kind the input is checked as
    if model:
        meta["model"] = True
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _float_loader() -> type[yaml.SafeLoader]:
    # PyYAML follows YAML 1.1, where "7e-6" is a string; recipes are full of such
    # learning rates, so teach the loader the YAML 1.2 float form.
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
        list("-+0123456789."),
    )
    return Loader


YamlLoader = _float_loader()


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML text; syntax errors become ConfigError naming ``source`` and the line."""
    try:
        return yaml.load(text, Loader=YamlLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None


MAX_VALUES = 200_000
MAX_INT = 2**53  # beyond this an integer setting is a typo (and no longer exact as a JSON number or a float)


def check_size(data: Any, source: str, limit: int = MAX_VALUES) -> None:
    """Refuse a document that expands to more than ``limit`` values (YAML aliases nested into an alias bomb).

    PyYAML shares aliased nodes, so loading is cheap, but anything that walks the result (the
    fingerprint, validation, the manifest) would walk every expansion. The walk stops at the limit.
    """
    seen = 0
    stack = [data]
    while stack:
        node = stack.pop()
        seen += 1
        if seen > limit:
            raise ConfigError(f"{source}: the document expands to more than {limit:,} values (nested YAML aliases?); "
                              "write the values out or simplify the anchors")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def parse_scalar(text: str) -> Any:
    """Parse a command-line override value the way YAML would."""
    return load_yaml(text, "<override>") if text != "" else ""


def type_name(tp: Any) -> str:
    """Human-readable name of a field type, for error messages."""
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of str to {type_name(get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _fail(source: str, path: str, msg: str) -> ConfigError:
    return ConfigError(f"{source}: {path or '<top>'}: {msg}")


def convert(tp: Any, value: Any, path: str, source: str) -> Any:
    """Check ``value`` against type ``tp`` and return it (nested dataclasses built)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return convert(a, value, path, source)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise _fail(source, path, f"expected {type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise _fail(source, path, f"expected {type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise _fail(source, path, f"expected {type_name(tp)}, got {type(value).__name__} {value!r}")
        (item,) = get_args(tp)
        return [convert(item, v, f"{path}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(source, path, f"expected {type_name(tp)}, got {type(value).__name__}")
        _, vt = get_args(tp)
        return {str(k): convert(vt, v, f"{path}.{k}", source) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _fail(source, path, f"expected {type_name(tp)}, got {type(value).__name__} {value!r}")
        return build(tp, value, path, source)
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(source, path, f"expected a boolean, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(source, path, f"expected an integer, got {value!r}")
        if abs(value) > MAX_INT:
            raise _fail(source, path, f"{value} is out of range (at most {MAX_INT:,} in absolute value)")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(source, path, f"expected a number, got {value!r}")
        if isinstance(value, int) and abs(value) > MAX_INT or not math.isfinite(float(value)):
            raise _fail(source, path, f"expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _fail(source, path, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def build(cls: type, data: dict, path: str = "", source: str = "<config>") -> Any:
    """Build dataclass ``cls`` from ``data`` strictly (see module docstring)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{path}." if path else ""
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else f" (expected one of: {', '.join(fields)})"
            raise _fail(source, f"{prefix}{key}", f"unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = convert(hints[name], data[name], f"{prefix}{name}", source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _fail(source, f"{prefix}{name}", f"missing required key (expected {type_name(hints[name])})")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if callable(check):
        try:
            # check(given) learns which keys the recipe set, so a key without effect can be refused
            if inspect.signature(check).parameters:
                check(frozenset(data))
            else:
                check()
        except ValueError as e:
            raise _fail(source, path or cls.__name__, str(e)) from None
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass (possibly nested) to plain dict, for writing the resolved recipe."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _section_type(tp: Any) -> type | None:
    """The dataclass of a field typed ``Section`` or ``Section | None`` (else None)."""
    if dataclasses.is_dataclass(tp):
        return tp
    if get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            return inner[0]
    return None


def field_doc(cls: type, nested: bool = False, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(name, type, default, doc) for each field: used by ``posttrain keys`` to document recipes.

    With ``nested``, the keys of sections (``train``, ``lora``, ``merging``...) follow their
    section as dotted names, so every key a recipe can set is listed.
    """
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            d = f.default
        elif f.default_factory is not dataclasses.MISSING:
            d = f.default_factory()
        else:
            d = "<required>"
        sec = _section_type(hints[f.name]) if nested else None
        out.append((prefix + f.name, type_name(hints[f.name]), "<section>" if sec and d is not None else to_dict(d),
                    f.metadata.get("doc", "")))
        if sec is not None:
            out.extend(field_doc(sec, True, f"{prefix}{f.name}."))
    return out
