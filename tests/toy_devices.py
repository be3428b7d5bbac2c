"""Device adapters used by the tests, loaded through the public spec ``tests.toy_devices:NAME``.

They import nothing from blackbox_sat, as a lab's adapter would not.
"""

import numpy as np


class Opaque:
    """A black-box analog device: a saturating nonlinear map nobody in the repository models.

    ``y = tanh(A(theta) x) + 0.2 * sin(3 x[:, :1] * theta[0])`` where the weights
    ``A(theta) = W1 * cos(theta @ P)`` mix every control into every weight.
    """

    def __init__(self, seed=0, noise=0.005, in_dim=6, out_dim=4, n_params=12, fail=None):
        rng = np.random.default_rng(seed)
        self.n_params, self.in_dim, self.out_dim = n_params, in_dim, out_dim
        self.bounds = (np.zeros(n_params), np.ones(n_params))
        self.W1 = rng.normal(0, 1.2, (out_dim, in_dim))
        self.P = rng.normal(0, 1.0, (n_params, out_dim * in_dim))
        self.noise, self.fail, self.calls = noise, fail, 0
        self._rng = np.random.default_rng([seed, 99])

    def query(self, theta, x):
        self.calls += 1
        a = self.W1 * np.cos(theta @ self.P).reshape(self.out_dim, self.in_dim)
        y = np.tanh(x @ a.T) + 0.2 * np.sin(3 * x[:, :1] * theta[0])
        if self.fail == "nan" and self.calls > 3:
            y[:] = np.nan
        return y + self._rng.normal(0, self.noise, y.shape)


def opaque(seed=0, **kw):
    return Opaque(seed=seed, **kw)


class CrashOnce:
    """Wraps a device; the first ``query`` made anywhere (any process) with a given
    ``marker`` path kills its own process with SIGKILL, as a worker that dies mid-trial.
    Every later query, in any process, is passed through. Other members are the wrapped
    device's (so model-based methods find its ``nominal_model``/``true_model``)."""

    def __init__(self, device, marker):
        self.device, self.marker = device, str(marker)

    def __getattr__(self, name):
        if name in ("device", "marker"):
            raise AttributeError(name)
        return getattr(self.device, name)

    def query(self, theta, x):
        import os
        import signal

        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return self.device.query(theta, x)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)


def crash_once(marker, seed=0, **kw):
    """The built-in ``mzi`` chip (``seed``, ``**kw``) behind :class:`CrashOnce`: for the
    worker-failure tests of the Ray backend. Unlike the adapters above it wraps a
    blackbox_sat simulator (imported here, not at module import)."""
    from blackbox_sat.sim import BUILTINS

    return CrashOnce(BUILTINS["mzi"](seed=seed, **kw), marker)


class Bare:
    """A new user's first adapter: the four contract members only (no ``bounds``, no
    ``input_bounds``), a random linear map with a tanh. ``flat=True`` answers zeros, so no
    readout gain can be calibrated. ``Bare.queries`` counts ``query`` calls in this process."""

    queries = 0

    def __init__(self, seed=0, noise=0.0, in_dim=4, out_dim=3, flat=False):
        self.in_dim, self.out_dim, self.n_params = in_dim, out_dim, in_dim * out_dim
        self.w0 = np.random.default_rng(seed).normal(0, 0.5, (out_dim, in_dim))
        self.noise, self.flat = noise, flat
        self._rng = np.random.default_rng([seed, 7])

    def query(self, theta, x):
        Bare.queries += 1
        if self.flat:
            return np.zeros((len(x), self.out_dim))
        y = np.tanh(x @ (self.w0 + theta.reshape(self.out_dim, self.in_dim)).T)
        return y + self.noise * self._rng.normal(size=y.shape)


def bare(seed=0, noise=0.0, in_dim=4, out_dim=3, flat=False):
    return Bare(seed, noise, in_dim, out_dim, flat)


class Jagged(Opaque):
    """An :class:`Opaque` device whose outputs also depend on the controls through a
    high-frequency term (period 1/100 of the bound width, below the trust radius), built to
    defeat a smooth surrogate: its predicted changes do not come true on the device, while
    guided-ES pairs, whose spacing averages the ripple, still make progress."""

    def __init__(self, seed=0, amplitude=0.3, freq=100.0, **kw):
        super().__init__(seed=seed, **kw)
        rng = np.random.default_rng([seed, 7])
        self.Q = rng.normal(0, 1.0, (self.n_params, self.out_dim))
        self.amplitude, self.freq = amplitude, freq

    def query(self, theta, x):
        y = super().query(theta, x)
        return y + self.amplitude * np.sin(2 * np.pi * self.freq * (theta @ self.Q))[None, :]


def jagged(seed=0, **kw):
    return Jagged(seed=seed, **kw)


class BarePeriodic:
    """A lab's minimal adapter: the four required members only, no bounds, no ``periodic``.
    Its response is periodic in every control (a phase-like ``cos``) with a period of 2 pi
    in device units, scaled by ``unit`` (the same device in other units)."""

    def __init__(self, seed=0, unit=1.0, in_dim=4, out_dim=3, n_params=16, noise=0.002):
        rng = np.random.default_rng(seed)
        self.n_params, self.in_dim, self.out_dim = n_params, in_dim, out_dim
        self.unit, self.noise = unit, noise
        self.W = rng.normal(0, 1.0, (n_params, out_dim, in_dim)) / np.sqrt(n_params) * 3
        self.phase = rng.uniform(0, 2 * np.pi, n_params)  # fixed offsets, as in any real shifter
        self._rng = np.random.default_rng([seed, 99])

    def query(self, theta, x):
        c = np.cos(np.asarray(theta, float) / self.unit + self.phase)  # (n_params,)
        a = np.tensordot(c, self.W, axes=1)  # (out_dim, in_dim)
        y = np.tanh(x @ a.T)
        return y + self._rng.normal(0, self.noise, y.shape)


def bare_periodic(seed=0, **kw):
    return BarePeriodic(seed=seed, **kw)
