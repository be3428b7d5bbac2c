"""Device specs: strings that name a device.

- a built-in simulator name: ``mzi``, ``mrr``, ``freespace``;
- ``package.module:factory``, called with the keyword arguments;
- ``tcp://host:port``, a device served by ``blackbox-sat serve-device``.

Keyword values given as strings (``--device-kw key=value``) are parsed as Python literals.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import os
import sys

from .contract import DeviceContractError, InvalidInput, describe

#: Device keywords that are secrets: given to the device, never written, returned or printed
#: (a resumed run or an evaluation reads the token from $BLACKBOX_SAT_TOKEN instead).
SECRET_DEVICE_KW = ("token",)


def public_kw(kw: dict | None) -> dict:
    """``kw`` without its secrets (:data:`SECRET_DEVICE_KW`): what may be stored or shown."""
    return {k: v for k, v in (kw or {}).items() if k not in SECRET_DEVICE_KW}


def parse_kv(items: list[str] | None) -> dict:
    """``["a=1", "b=mzi", "c=[1,2]"]`` -> ``{"a": 1, "b": "mzi", "c": [1, 2]}``."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise InvalidInput(f"expected key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key.strip()] = raw
    return out


def resolve_factory(spec: str):
    """The callable a ``module:attr`` or built-in spec names."""
    from blackbox_sat.sim import BUILTINS

    if spec in BUILTINS:
        return BUILTINS[spec]
    if ":" not in spec:
        raise DeviceContractError(
            f"unknown device spec {spec!r}: use a built-in ({', '.join(BUILTINS)}), package.module:factory, or tcp://host:port"
        )
    module_name, attr = spec.split(":", 1)
    try:
        module = _import_here_too(module_name)
    except ImportError as exc:
        raise DeviceContractError(
            f"cannot import module {module_name!r} of device spec {spec!r}: {exc}"
        ) from exc
    try:
        factory = getattr(module, attr)
    except AttributeError as exc:
        raise DeviceContractError(
            f"module {module_name!r} has no attribute {attr!r} (device spec {spec!r})"
        ) from exc
    return factory


def _import_here_too(module_name: str):
    """Import ``module_name`` from ``sys.path``, else from the current folder.

    The installed ``blackbox-sat`` script does not put the current folder on ``sys.path``
    (``python -m`` does), so an adapter next to the user would not be found otherwise."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        here = os.getcwd()
        top = module_name.split(".")[0]
        if exc.name != top or here in sys.path or "" in sys.path:
            raise
        sys.path.append(here)
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError:
            sys.path.remove(here)
            raise exc from None


def module_home(spec) -> str | None:
    """The folder from which a ``module:factory`` spec's module was imported (the parent of
    its top-level package), so a stored run can import it again from any folder."""
    if not isinstance(spec, str) or ":" not in spec or spec.startswith("tcp://"):
        return None
    top = sys.modules.get(spec.split(":", 1)[0].split(".")[0])
    path = getattr(top, "__file__", None)
    if path is None:
        return None
    home = os.path.dirname(os.path.abspath(path))
    return os.path.dirname(home) if os.path.basename(path) == "__init__.py" else home


def search_also(folder: str | None) -> None:
    """Let device specs import modules from ``folder`` too (a stored run's ``module_home``)."""
    if folder and folder not in sys.path and os.path.isdir(folder):
        sys.path.append(folder)


def accepts_seed(factory) -> bool:
    """Whether a factory makes chip instances (it takes ``seed``)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return "seed" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


#: Default types a keyword's value must match (bool before int: a bool is an int in Python).
_KINDS = ((bool, (bool,)), (int, (int,)), (float, (int, float)), (str, (str,)))


def check_keywords(factory, kwargs: dict, spec: str) -> None:
    """Refuse a keyword the factory does not take, or a value whose type differs from the
    keyword's default (``noise='abc'`` where the default is ``0.01``), before the factory runs.

    The check reads only the signature, so a bad ``--device-kw`` stops a command before a
    run folder exists or the device is touched; keywords without a typed default pass."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key, value in kwargs.items():
        if key not in params:
            if takes_any:
                continue
            close = difflib.get_close_matches(key, names, n=1)
            hint = (
                f"did you mean {close[0]!r}?"
                if close
                else f"it takes: {', '.join(names) or 'none'}"
            )
            raise InvalidInput(f"unknown --device-kw key {key!r} for {spec!r}; {hint}")
        default, note = params[key].default, params[key].annotation
        for kind, ok in _KINDS:
            if isinstance(default, kind):
                if note is not inspect.Parameter.empty and note not in (kind, kind.__name__):
                    break  # annotated wider than its default (``float | tuple``): trust the factory
                if not isinstance(value, ok) or (kind is not bool and isinstance(value, bool)):
                    raise InvalidInput(
                        f"--device-kw {key}={value!r}: {spec!r} expects {kind.__name__} "
                        f"(default {default!r})"
                    )
                break


def load_device(spec, **kwargs):
    """Build a device from a spec string (or return a device object unchanged).

    ``kwargs`` go to the factory (or, for ``tcp://``, to the client).
    """
    if not isinstance(spec, str):
        if kwargs:
            raise InvalidInput(
                "device keywords only apply to a spec string, not to a device object"
            )
        describe(spec)
        return spec
    if spec.startswith("tcp://"):
        from .remote import RemoteDevice

        return RemoteDevice(spec, **kwargs)
    factory = resolve_factory(spec)
    check_keywords(factory, kwargs, spec)
    try:
        device = factory(**kwargs)
    except TypeError as exc:
        raise DeviceContractError(
            f"device factory {spec!r} rejected keywords {sorted(kwargs)}: {exc}"
        ) from exc
    describe(device)
    return device
