"""Recipes: YAML files + ``key=value`` overrides -> typed dataclass configs.

A config is a tree of ``@dataclass`` classes.  Each field carries its help text in
``field(metadata={"help": ..., "min": ..., "max": ..., "exists": True})``.  :func:`load` merges, in
order, the dataclass defaults, a recipe YAML and command-line overrides with dotted keys
(``train.lr=3e-4``), validates everything and raises **one** :class:`~genkit.errors.ConfigError` that
lists every problem with its key (unknown key with a suggestion, wrong type, value out of range, not
one of the allowed choices, missing file).

Example::

    @dataclass
    class TrainConfig:
        lr: float = field(default=1e-3, metadata={"help": "Adam learning rate", "min": 0.0})

    cfg = load(TrainConfig, "recipes/x.yaml", ["lr=3e-4"])
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from genkit.errors import ConfigError

__all__ = ["field", "load", "to_dict", "dump", "parse_overrides", "describe", "split_args"]


def field(default=dataclasses.MISSING, *, help: str = "", default_factory=dataclasses.MISSING, **checks):
    """A dataclass field with its help text and checks (``min``, ``max``, ``exists``) in its metadata."""
    meta = {"help": help, **checks}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------- parsing
def split_args(args: list[str] | None) -> tuple[str | None, list[str]]:
    """Split the free command-line arguments into an optional recipe path and ``key=value`` overrides."""
    recipe, overrides, problems = None, [], []
    for a in args or []:
        if "=" in a:
            overrides.append(a)
        elif a.endswith((".yaml", ".yml")) and recipe is None:
            recipe = a
        else:
            problems.append(f"argument '{a}' is neither a recipe (.yaml) nor a key=value override")
    if problems:
        raise ConfigError(problems)
    return recipe, overrides


def parse_overrides(overrides: list[str]) -> dict:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}``; values are parsed as YAML scalars."""
    tree: dict = {}
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"override '{item}' is not of the form key=value")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                problems.append(f"override '{item}' sets a key inside a non-section value")
                break
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems)
    return tree


def _read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe '{p}' does not exist: give the path of a YAML file (see recipes/)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"recipe '{p}' is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe '{p}' must be a mapping of keys to values, not a {type(data).__name__}")
    return data


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


# -------------------------------------------------------------------------------------- validation
def _type_name(tp) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str, problems: list[str]):
    """Return ``value`` converted to ``tp`` or record a problem (and return the value unchanged)."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a section (mapping), got {value!r}")
            return value
        return _build(tp, value, key + ".", problems)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            trial: list[str] = []
            out = _coerce(value, a, key, trial)
            if not trial:
                return out
        problems.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        # YAML turns `no` into False and `1` into an int: accept the string spelling of a choice
        for c in choices:
            if isinstance(c, str) and str(value).lower() == c.lower():
                return c
        if value is False and "no" in choices:
            return "no"
        problems.append(f"{key}: {value!r} is not one of {', '.join(repr(c) for c in choices)}")
        return value
    if origin in (list, tuple):
        (inner,) = get_args(tp)[:1] or (Any,)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
            return value
        return [(_coerce(v, inner, f"{key}[{i}]", problems) if inner is not Any else v) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        problems.append(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        problems.append(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        problems.append(f"{key}: expected a number, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _check(value, f: dataclasses.Field, key: str, problems: list[str]) -> None:
    meta = f.metadata
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and value < lo:
            problems.append(f"{key}: {value} is below the minimum {lo}")
        if hi is not None and value > hi:
            problems.append(f"{key}: {value} is above the maximum {hi}")
    if meta.get("exists") and isinstance(value, str) and value and not Path(value).exists():
        problems.append(f"{key}: file or folder '{value}' does not exist")


def _build(cls, data: dict, prefix: str, problems: list[str]):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for k in data:
        if k not in fields:
            near = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f" (did you mean '{prefix}{near[0]}'?)" if near else f" (valid keys: {', '.join(fields)})"
            problems.append(f"{prefix}{k}: unknown key{hint}")
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        tp = hints[name]
        if name in data:
            value = _coerce(data[name], tp, key, problems)
            _check(value, f, key, problems)
            kwargs[name] = value
        elif dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, {}, key + ".", problems)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{key}: missing required value ({f.metadata.get('help', '')})".rstrip(" ()"))
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:  # post-init checks of the dataclass
        problems.append(f"{prefix.rstrip('.') or cls.__name__}: {e}")
        return None
    validate = getattr(obj, "validate", None)
    if callable(validate) and not problems:
        for p in validate() or []:
            problems.append(p)
    return obj


def load(cls, recipe: str | os.PathLike | None = None, overrides: list[str] | None = None, base: dict | None = None):
    """Build ``cls`` from its defaults, ``base`` (a dict), a recipe YAML and ``key=value`` overrides.

    Raises one :class:`ConfigError` listing every problem.  A dataclass may define ``validate(self) ->
    list[str]`` for cross-field checks; its messages must start with the key they are about.
    """
    data: dict = dict(base or {})
    if recipe is not None:
        data = _merge(data, _read_yaml(recipe))
    if overrides:
        data = _merge(data, parse_overrides(overrides))
    problems: list[str] = []
    obj = _build(cls, data, "", problems)
    if problems:
        raise ConfigError(problems)
    return obj


# ------------------------------------------------------------------------------------------ output
def model_config_from_dict(cls, d: dict, model_type: str, label: str, ignore: tuple[str, ...] = ()):
    """A model folder's config.json -> the dataclass ``cls``: its ``model_type`` must be ``model_type`` and every
    other key a field of ``cls`` (keys in ``ignore`` are dropped); all problems in one :class:`ConfigError`."""
    d = dict(d)
    found = d.pop("model_type", model_type)
    for k in ignore:
        d.pop(k, None)
    known = {f.name for f in dataclasses.fields(cls)}
    problems = [f"unknown {label} config key '{k}'" for k in d if k not in known]
    if found != model_type:
        problems.insert(0, f"model_type is '{found}', expected '{model_type}'")
    if problems:
        raise ConfigError(problems)
    return cls(**d)


def to_dict(cfg) -> dict:
    """A plain nested dict of a config (for YAML/JSON)."""
    return dataclasses.asdict(cfg)


def dump(cfg, path: str | os.PathLike | None = None) -> str:
    """The resolved config as YAML; written atomically to ``path`` when given."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
    if path is not None:
        from genkit.runtime.files import atomic_write_text

        atomic_write_text(path, text)
    return text


def describe(cls, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(key, default, help)`` for every leaf field, for ``--help`` epilogues and docs."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        rows.append((prefix + f.name, repr(default), f.metadata.get("help", "")))
    return rows
