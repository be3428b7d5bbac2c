"""blackbox_sat: sharpness-aware training of physical neural networks whose model nobody knows.

Public API (same names as the CLI)::

    import blackbox_sat as bs
    result = bs.train("mzi", task="digits", method="blackbox-sat", budget=2000, seed=0, out="runs/a")
    bs.evaluate(result, "mzi", device_kw={"seed": 101})   # -> {"accuracy": ...}
    bs.compare("mzi", task="digits", methods=["spsa", "oracle"], seeds=3, budget=2000, out="runs/cmp")

Names are imported on first use, so ``import blackbox_sat`` (and ``blackbox-sat --help``) does
not load torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.2.0"

#: public name -> module that defines it
_API = {
    "train": "blackbox_sat.harness.run",
    "resume": "blackbox_sat.harness.run",
    "evaluate": "blackbox_sat.harness.evaluate",
    "compare": "blackbox_sat.harness.compare",
    "check_device": "blackbox_sat.devices.check",
    "load_device": "blackbox_sat.devices.spec",
    "describe": "blackbox_sat.devices.contract",
    "DeviceContractError": "blackbox_sat.devices.contract",
    "DeviceOutputError": "blackbox_sat.devices.contract",
    "UserError": "blackbox_sat.devices.contract",
    "Ledger": "blackbox_sat.devices.ledger",
    "method_names": "blackbox_sat.methods",
    "register": "blackbox_sat.methods",
    "ConfigError": "blackbox_sat.training.config",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'blackbox_sat' has no attribute {name!r}")
