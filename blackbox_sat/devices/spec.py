"""Device specs: strings that name a device.

- a built-in simulator name: ``mzi``, ``mrr``, ``freespace``;
- ``package.module:factory``, called with the keyword arguments;
- ``tcp://host:port``, a device served by ``blackbox-sat serve-device``.

Keyword values given as strings (``--device-kw key=value``) are parsed as Python literals.
"""

from __future__ import annotations

import ast
import importlib
import inspect

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
        module = importlib.import_module(module_name)
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


def accepts_seed(factory) -> bool:
    """Whether a factory makes chip instances (it takes ``seed``)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return "seed" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


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
    try:
        device = factory(**kwargs)
    except TypeError as exc:
        raise DeviceContractError(
            f"device factory {spec!r} rejected keywords {sorted(kwargs)}: {exc}"
        ) from exc
    describe(device)
    return device
