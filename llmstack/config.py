"""Typed configs: dataclasses filled from YAML and dotted overrides, rejecting what they do not know.

This module is the engine only; each schema lives with the code it configures
(`llmstack.model.ModelConfig`, `llmstack.data.DataConfig`, `llmstack.train.TrainConfig`, ...).
It imports nothing heavier than PyYAML, so reading a config is instant.

`from_dict` turns a nested mapping into a dataclass. An unknown key names the
key and the nearest valid ones, a wrong type names the key and the expected
type. Rules between fields (heads dividing the width, ...) are checked by the
schema's `validate()` before any tensor is built.

    cfg = load_config(PretrainConfig, "configs/pretrain/quickstart.yaml",
                      overrides=["model.n_layers=4", "train.lr=3e-4"])

A schema documents each field with `option(default, "what it means")`: the text is
what `docs/configs.md` shows (`python scripts/config_reference.py` writes that page).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and what to do."""


def is_int(value) -> bool:
    """An int, and not a bool (which Python counts as one): what integer arguments are checked with."""
    return isinstance(value, int) and not isinstance(value, bool)


def option(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its one-line documentation (`factory` for a mutable default)."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"doc": doc})


# --------------------------------------------------------------------------- checks shared by schemas


def check_at_least(section: str, obj: Any, minimum: float, *names: str) -> None:
    """ConfigError naming the first of `names` that is below `minimum` (None counts as unset)."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not value >= minimum:  # NaN fails too
            raise ConfigError(f"{section}.{name} must be >= {minimum}, got {value}")
        if value == math.inf:
            raise ConfigError(f"{section}.{name} must be a finite number >= {minimum}, got {value}")


def check_fraction(section: str, obj: Any, *names: str, low_open: bool = False, high_open: bool = False) -> None:
    """ConfigError unless each field is a finite number in [0, 1] (open ends as asked)."""
    for name in names:
        value = getattr(obj, name)
        ok = math.isfinite(value) and (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
        if not ok:
            interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
            raise ConfigError(f"{section}.{name} must be in {interval}, got {value}")


# --------------------------------------------------------------------------- dataclasses <-> mappings


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return f"list of {_type_name(item)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1] or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if is_int(value):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _resolve(cls: type, data: Any) -> Any:
    """A schema may accept a shorthand for itself (a model preset's name): its classmethod
    `resolve_config_value(data)` turns that into a mapping."""
    hook = getattr(cls, "resolve_config_value", None)
    return hook(data) if hook is not None else data


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    data = _resolve(cls, data)
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(repr(f'{prefix}.{c}' if prefix else c) for c in close)}?" if close else ""
            raise ConfigError(f"unknown config key {full!r}{hint} (valid: {', '.join(fields)})")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def merge(base: dict, over: dict) -> dict:
    """`over` laid on `base`, nested mappings merged key by key (neither is modified)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _field_type(cls: Any, key: str) -> Any:
    """The dataclass type of field `key` of `cls` (through Optional), or None."""
    if cls is None or not dataclasses.is_dataclass(cls):
        return None
    tp = typing.get_type_hints(cls).get(key)
    candidates = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    return next((c for c in candidates if dataclasses.is_dataclass(c)), None)


def parse_value(text: str, key: str) -> Any:
    """An override's value, read as YAML (`3e-4`, `true`, `[1, 2]`, `null`)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"override {key}={text}: the value is not valid YAML ({problem}); quote it if it is "
                          f"meant as text") from None


def apply_overrides(data: dict, overrides: list[str], cls: Optional[type] = None) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested mapping. With the schema
    `cls`, a section given in shorthand (`model: tiny`) is expanded first, so that
    `model.n_layers=2` changes one field of the preset."""
    data = merge({}, data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        path, text = item.split("=", 1)
        keys = path.strip().split(".")
        if not all(keys):
            raise ConfigError(f"override {item!r}: {path.strip()!r} is not a dotted key like train.lr")
        node, node_cls = data, cls
        for k in keys[:-1]:
            node_cls = _field_type(node_cls, k)
            if node_cls is not None and node.get(k) is not None and not isinstance(node[k], dict):
                node[k] = _resolve(node_cls, node[k])
            if node.get(k) is None:
                node[k] = {}
            if not isinstance(node[k], dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
            node = node[k]
        node[keys[-1]] = parse_value(text, path.strip())
    return data


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML file holding a mapping; a missing file, a syntax error (with its line) or any other
    top level is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found" if not p.exists() else f"{str(p)!r} is not a file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {str(p)!r}{where}: {problem} (YAML indents with spaces, never tabs)") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text ({e.reason})") from None
    if data is None:
        raise ConfigError(f"config file {str(p)!r} is empty; give at least the sections you change (see configs/)")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping (key: value lines) at the top level, "
                          f"got {type(data).__name__}")
    return data


def load_config(cls: type, path: Optional[str | os.PathLike] = None, overrides: Optional[list[str]] = None) -> Any:
    """Read a YAML file into `cls`, apply dotted overrides, validate."""
    data = read_yaml(path) if path is not None else {}
    cfg = from_dict(cls, apply_overrides(data, list(overrides or []), cls))
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def reference_rows(cls: type, prefix: str) -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) of every field of schema `cls`, nested schemas expanded after
    their own row: what `docs/configs.md` lists."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}.{f.name}", hints[f.name]
        nested = _field_type(cls, f.name)
        if f.default is not dataclasses.MISSING or (nested is None and f.default_factory is not dataclasses.MISSING):
            value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            default = "null" if value is None else yaml.safe_dump(value, default_flow_style=True).strip()
            default = default.removesuffix("\n...").strip()
        else:
            default = "(section)"
        type_name = "section" if nested is not None and default == "(section)" else _type_name(tp)
        if nested is not None:
            type_name = type_name.replace(nested.__name__, "section")
        rows.append((key, type_name, default, f.metadata.get("doc", "")))
        if nested is not None:
            rows += reference_rows(nested, key)
    return rows


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    Path(path).write_text(dump_config(cfg))
