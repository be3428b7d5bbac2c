"""Training methods, registered by name (see :mod:`.registry`).

Importing this package registers every built-in method, so ``get_method`` and
``method_names`` always see all of them.
"""

from . import blackbox, gradient_free, harmonic, model_based, twin  # noqa: F401  (each registers its methods on import)
from .registry import METHODS, MethodResult, MethodSpec, get_method, method_names, register

__all__ = ["METHODS", "MethodResult", "MethodSpec", "get_method", "method_names", "register"]
