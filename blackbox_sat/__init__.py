"""blackbox_sat: sharpness-aware training of physical neural networks whose model nobody knows.

Public API (same names as the CLI)::

    import blackbox_sat as bs
    result = bs.train("mzi", task="digits", method="blackbox-sat", budget=2000, seed=0, out="runs/a")
    bs.evaluate(result, "mzi", device_kw={"seed": 101})   # -> {"accuracy": ...}
    bs.compare("mzi", task="digits", methods=["spsa", "oracle"], seeds=3, budget=2000, out="runs/cmp")
"""
from blackbox_sat.harness.compare import compare
from blackbox_sat.devices.check import check_device
from blackbox_sat.devices.contract import DeviceContractError, DeviceOutputError, describe
from blackbox_sat.devices.ledger import Ledger
from blackbox_sat.devices.spec import load_device
from blackbox_sat.harness.evaluate import evaluate
from blackbox_sat.methods.registry import method_names, register
from blackbox_sat.harness.run import resume, train

__all__ = ["train", "resume", "evaluate", "compare", "check_device", "load_device", "describe", "Ledger",
           "method_names", "register", "DeviceContractError", "DeviceOutputError"]
__version__ = "0.1.0"
