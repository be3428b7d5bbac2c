"""Typed configuration: frozen dataclasses built from defaults plus ``--set`` overrides.

``build(cls, {"rho": "0.05", "refine.rule": "spsa"})`` returns ``cls`` with those fields
replaced. Dotted keys reach nested dataclasses (``surrogate.hyper.max_steps``; a ``-`` in a
key reads as ``_``, so family names can be written as they are registered). Values given as
text are coerced to the field's annotated type; an unknown key or an uncoercible value raises
:class:`ConfigError` naming the key, the expected type and the closest valid key, before any
setting is spent. Nested overrides replace single fields, never a whole nested default.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from blackbox_sat.devices.contract import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A ``--set`` key that does not exist, or a value that does not fit its field."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Options every method accepts besides its own."""

    pnn: Literal["device", "hybrid"] = (
        "device"  # device-only PNN, or digital layers around the device
    )
    threads: int = 1  # torch threads of this run
    sharpness_samples: int = 256  # training inputs for result.json's Hessian eigenvalue
    scale: float | None = None  # unit of parameters without bounds (None: measured)


def flatten(overrides: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; dotted keys pass through."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and all(isinstance(k, str) for k in value):
            out.update(flatten(value, full + "."))
        else:
            out[full] = value
    return out


def field_names(cls_or_obj: Any, prefix: str = "") -> list[str]:
    """Every settable dotted key of a config class or instance."""
    obj = cls_or_obj() if isinstance(cls_or_obj, type) else cls_or_obj
    names = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            names += field_names(value, f"{prefix}{f.name}.")
        else:
            names.append(prefix + f.name)
    return names


def build(cls: type[T], overrides: Mapping[str, Any] | None = None, what: str = "--set") -> T:
    """``cls()`` with ``overrides`` (dotted or nested keys) applied and coerced."""
    obj: Any = cls()
    for key, value in _renamed(cls, flatten(dict(overrides or {}))).items():
        obj = _set(obj, key.replace("-", "_").split("."), value, key, what, "")
    return obj


def _renamed(cls: type, flat: dict[str, Any]) -> dict[str, Any]:
    """Apply ``cls.RENAMED`` (old key or prefix -> new dotted key), so runs written before a
    rename still resume."""
    renamed: Mapping[str, str] = getattr(cls, "RENAMED", {})
    out: dict[str, Any] = {}
    for key, value in flat.items():
        for old, new in renamed.items():
            if key == old or key.startswith(old + "."):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


def _set(obj: Any, path: list[str], value: Any, key: str, what: str, prefix: str) -> Any:
    names = {f.name for f in dataclasses.fields(obj)}
    head = path[0]
    if head not in names:
        valid = field_names(obj, prefix)
        close = difflib.get_close_matches(key.replace("-", "_"), valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
        raise ConfigError(f"unknown {what} key {key!r} for {type(obj).__name__}{hint}")
    current = getattr(obj, head)
    if dataclasses.is_dataclass(current):
        if len(path) == 1:
            scalar = getattr(current, "SCALAR_FIELD", None)
            if scalar is None or isinstance(value, Mapping):
                raise ConfigError(
                    f"{what}: {key!r} is a group of options; set one of them, e.g. "
                    f"{key}.{dataclasses.fields(current)[0].name}=..."
                )
            path = [head, scalar]
        new = _set(current, path[1:], value, key, what, f"{prefix}{head}.")
    elif len(path) > 1:
        raise ConfigError(f"{what}: {key!r}: {head!r} has no nested options")
    else:
        hint = get_type_hints(type(obj)).get(head, Any)
        new = coerce(value, hint, key, what)
    try:
        return dataclasses.replace(obj, **{head: new})
    except (ValueError, TypeError) as exc:  # the class's own check of the new value
        raise ConfigError(f"{what}: {key}={value!r}: {exc}") from None


def type_name(hint: Any) -> str:
    """A readable name of a type annotation: ``float``, ``int or None``, ``one of 'a', 'b'``."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("None" if a is type(None) else type_name(a) for a in args)
    if origin in (tuple, list):
        return f"a list of {type_name(args[0])}" if args else "a list"
    return getattr(hint, "__name__", str(hint))


def coerce(value: Any, hint: Any, key: str = "value", what: str = "--set") -> Any:
    """``value`` as type ``hint``; text is parsed. Raises :class:`ConfigError`."""
    try:
        return _coerce(value, hint)
    except (ValueError, TypeError, SyntaxError):
        raise ConfigError(f"{what}: {key}={value!r}: expected {type_name(hint)}") from None


def _coerce(value: Any, hint: Any) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any or hint is typing.Any:
        return _literal(value) if isinstance(value, str) else value
    if origin is Literal:
        for a in args:
            if value == a or (isinstance(value, str) and str(a) == value.strip()):
                return a
        raise ValueError(value)
    if origin in (Union, types.UnionType):
        is_none = value is None or (
            isinstance(value, str) and value.strip().lower() in ("none", "null")
        )
        if is_none and type(None) in args:
            return None
        for arm in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arm)
            except (ValueError, TypeError, SyntaxError):
                continue
        raise ValueError(value)
    if origin in (tuple, list) or hint in (tuple, list):
        if isinstance(value, str):
            text = value.strip()
            value = (
                _literal(text)
                if text[:1] in "(["
                else [v.strip() for v in text.split(",") if v.strip()]
            )
        if not isinstance(value, (list, tuple)):
            raise TypeError(value)
        inner = args[0] if args else Any
        items = [_coerce(v, inner) for v in value]
        return tuple(items) if (origin or hint) is tuple else items
    if hint is dict or origin is dict:
        value = _literal(value) if isinstance(value, str) else value
        if not isinstance(value, dict):
            raise TypeError(value)
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ValueError(value)
    if hint is int:
        if isinstance(value, bool):
            raise TypeError(value)
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value) if not isinstance(value, str) else int(value.strip())
    if hint is float:
        if isinstance(value, bool):
            raise TypeError(value)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    return value


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def as_dict(config: Any) -> dict[str, Any]:
    """The resolved configuration as plain JSON data (for ``config.json``; tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))
