"""Built-in simulated PNN platforms: ``mzi``, ``mrr`` and ``freespace``."""

from .base import SimulatedDevice
from .freespace import FreeSpaceVMM, freespace
from .mrr import MRRWeightBank, mrr
from .mzi import MZIMesh, mzi

#: Built-in device names accepted as device specs.
BUILTINS = {"mzi": mzi, "mrr": mrr, "freespace": freespace}

__all__ = [
    "BUILTINS",
    "FreeSpaceVMM",
    "MRRWeightBank",
    "MZIMesh",
    "SimulatedDevice",
    "freespace",
    "mrr",
    "mzi",
]
