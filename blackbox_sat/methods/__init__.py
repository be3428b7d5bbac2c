"""Training methods, registered by name. See :mod:`.registry`."""
from .registry import METHODS, MethodResult, MethodSpec, get_method, method_names, register

__all__ = ["METHODS", "MethodResult", "MethodSpec", "get_method", "method_names", "register"]
