"""Gaussian-process surrogate (gpytorch).

Inputs are ``[phi(z_theta), z_x]``: normalised ``theta`` with periodic columns as ``(sin, cos)``
(:class:`~surrogates.encoding.PeriodicEncoding`) and normalised ``x``; outputs are
standardised. The kernel is ARD (one lengthscale per input column), Matern 5/2 or RBF, scaled,
with a constant mean and learned Gaussian noise per output.

Two regimes, chosen by the number of rows ``n``:

- ``n <= exact_max_rows`` (default 1000): an **exact** GP, one independent GP per output as
  a batch (``batch_shape = (out_dim,)``), hyperparameters fit by Adam on the exact marginal
  likelihood with Cholesky solves: a step costs about ``out_dim * n^3`` flops with its
  backward pass. ``method="exact"`` subsamples larger data to ``exact_max_rows`` rows.
- beyond: a **variational** GP (``ApproximateGP`` + ``VariationalStrategy`` on
  ``num_inducing`` learned inducing points), fit by Adam on the minibatch ELBO. Independent
  outputs (default) are one batch of GPs with a batch Gaussian likelihood, not a multitask
  distribution, so that only marginal variances are formed. With ``multitask="lmc"``,
  ``n_latents`` latent GPs are mixed linearly into the outputs (``LMCVariationalStrategy``
  with a ``MultitaskGaussianLikelihood``), sharing strength between correlated outputs.

Measured (1 CPU thread on a shared machine; 20 parameters, 8 inputs, 4 outputs, a smooth
response over a trust region; held-out R^2):

| rows | regime | fit | R^2 | grad of a loss through ``predict`` (128 rows) |
|---|---|---|---|---|
| 256 | exact, 150 steps | 6.5 s | 0.29 | 7 ms |
| 512 | exact, 150 steps | 51 s | 0.78 | 26 ms |
| 1000 | exact, 150 steps | 132 s | 0.945 | 18 ms |
| 2000 | variational, 1000 steps | 23 s | 0.88 | 8 ms |
| 8000 | variational, 1000 steps | 24 s | 0.92 | 8 ms |
| 32000 | variational, 1000 steps | 24 s | 0.92 | 8 ms |

An exact step grows as ``n^3`` (gpytorch's backward pass forms ``n x n`` products per
output), which is why the threshold is 1000 rows rather than more; a variational step is
independent of ``n``. ``method="exact"`` on a 1000-row subsample can beat the variational
GP on all rows (0.945 against 0.92 above) at five times the fit time.

Where it stops being the right choice: a stationary kernel over ``n_params + in_dim``
columns needs data that fill that space at the lengthscales of the response. Past a few tens
of input columns (e.g. 50 phases + 16 inputs) the ARD fit becomes unreliable and 128
inducing points cannot cover the trust region; past some thousands of rows the exact GP is
too slow and the variational one no more accurate than a neural ensemble, which fits the
same data in a similar time. Use it for devices with at most about 50 control parameters
and a few thousand rows; use the neural surrogates (:mod:`surrogates.neural`) beyond, and
for a 160-parameter device always.

``predict`` returns the posterior mean of the latent function, differentiable with respect
to ``theta`` and ``x`` (gpytorch's prediction caches hold no graph: hyperparameters are frozen
after fitting). ``predict_with_uncertainty`` returns its posterior standard deviation
(epistemic: without the measurement noise), computed with ``fast_pred_var`` (LOVE).
"""

from __future__ import annotations

import math
from typing import Any

import gpytorch
import numpy as np
import torch

from .base import SurrogateBase
from .encoding import PeriodicEncoding
from .normalize import AffineNormalizer
from .protocol import ArrayLike

# Exact GPs here are at most exact_max_rows: always factorise by Cholesky, never CG/Lanczos,
# whose stochastic estimates would make fits noisy and predictions differ between calls.
_CHOLESKY_ALWAYS = 100_000


def _kernel(name: str, dim: int, batch: torch.Size) -> gpytorch.kernels.Kernel:
    if name == "matern52":
        base = gpytorch.kernels.MaternKernel(nu=2.5, ard_num_dims=dim, batch_shape=batch)
    elif name == "rbf":
        base = gpytorch.kernels.RBFKernel(ard_num_dims=dim, batch_shape=batch)
    else:
        raise ValueError(f"kernel must be 'matern52' or 'rbf', got {name!r}")
    return gpytorch.kernels.ScaleKernel(base, batch_shape=batch)


class BatchExactGP(gpytorch.models.ExactGP):
    """``T`` independent exact GPs as one batch: inputs ``(T, n, d)``, targets ``(T, n)``.

    A plain batch (not a multitask distribution) keeps every solve a batch of ``n x n``
    Cholesky factors; the multitask form would build a dense ``nT x nT`` covariance.
    """

    def __init__(
        self,
        train_z: torch.Tensor,
        train_y: torch.Tensor,
        likelihood: gpytorch.likelihoods.Likelihood,
        kernel: str,
    ):
        super().__init__(train_z, train_y, likelihood)
        batch = torch.Size([train_y.shape[0]])
        self.mean_module = gpytorch.means.ConstantMean(batch_shape=batch)
        self.covar_module = _kernel(kernel, train_z.shape[-1], batch)

    def forward(self, z: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))


class BatchVariationalGP(gpytorch.models.ApproximateGP):
    """Sparse variational GPs on inducing points ``(L, n_inducing, d)``.

    ``lmc=False``: ``L = T`` independent GPs as one batch (inputs ``(T, b, d)``, outputs a
    batch of ``T`` marginals); only marginal variances enter the ELBO, which keeps a step at
    a few matrix products. ``lmc=True``: ``L`` latent GPs mixed into ``T`` outputs by
    ``LMCVariationalStrategy`` (a multitask distribution over ``(b, T)``).
    """

    def __init__(self, inducing: torch.Tensor, n_tasks: int, kernel: str, lmc: bool):
        n_latents = inducing.shape[0]
        batch = torch.Size([n_latents])
        distribution = gpytorch.variational.CholeskyVariationalDistribution(
            inducing.shape[-2], batch_shape=batch
        )
        strategy = gpytorch.variational.VariationalStrategy(
            self, inducing, distribution, learn_inducing_locations=True
        )
        if lmc:
            strategy = gpytorch.variational.LMCVariationalStrategy(
                strategy, num_tasks=n_tasks, num_latents=n_latents, latent_dim=-1
            )
        super().__init__(strategy)
        self.mean_module = gpytorch.means.ConstantMean(batch_shape=batch)
        self.covar_module = _kernel(kernel, inducing.shape[-1], batch)

    def forward(self, z: torch.Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))


class GPSurrogate(SurrogateBase):
    """Gaussian-process surrogate; see the module docstring for the model and its limits.

    Args:
        kernel: ``"matern52"`` (default) or ``"rbf"``, ARD.
        method: ``"auto"`` (exact up to ``exact_max_rows`` rows, variational beyond),
            ``"exact"`` (subsample to ``exact_max_rows``) or ``"variational"``.
        multitask: ``"independent"`` (default) or ``"lmc"`` (variational only).
        n_latents: latent GPs of the LMC (default ``min(out_dim, 4)``).
        exact_max_rows: largest exact GP (default 1000).
        num_inducing: inducing points per latent GP (default 128).
        fit_steps, update_steps: Adam steps of :meth:`fit` (default 150 exact, 1000
            variational) and of :meth:`update` (default 50 exact, 200 variational).
        lr: Adam learning rate (default 0.1 exact, 0.02 variational).
        batch_size: ELBO minibatch rows (variational, default 256). gpytorch evaluates the
            kernel on ``(num_inducing + batch_size)^2`` pairs per step, so larger batches cost
            quadratically.
        theta_low, theta_high, periodic, seed, dtype: see :class:`~surrogates.base.SurrogateBase`
            (``dtype`` defaults to ``"float64"``: Cholesky factors need it).
    """

    def __init__(
        self,
        *,
        kernel: str = "matern52",
        method: str = "auto",
        multitask: str = "independent",
        n_latents: int | None = None,
        exact_max_rows: int = 1000,
        num_inducing: int = 128,
        fit_steps: int | None = None,
        update_steps: int | None = None,
        lr: float | None = None,
        batch_size: int = 256,
        dtype: str = "float64",
        **base_kw,
    ):
        super().__init__(dtype=dtype, **base_kw)
        if method not in ("auto", "exact", "variational"):
            raise ValueError(f"method must be 'auto', 'exact' or 'variational', got {method!r}")
        if multitask not in ("independent", "lmc"):
            raise ValueError(f"multitask must be 'independent' or 'lmc', got {multitask!r}")
        self.kernel, self.method, self.multitask = kernel, method, multitask
        self.n_latents, self.exact_max_rows, self.num_inducing = (
            n_latents,
            int(exact_max_rows),
            int(num_inducing),
        )
        self.fit_steps, self.update_steps, self.lr = fit_steps, update_steps, lr
        self.batch_size = int(batch_size)
        self.model: BatchExactGP | BatchVariationalGP | None = None
        self.likelihood: gpytorch.likelihoods.Likelihood | None = None
        self.mode: str | None = None
        self.theta_norm: AffineNormalizer | None = None
        self.x_norm: AffineNormalizer | None = None
        self.y_norm: AffineNormalizer | None = None
        self.encode: PeriodicEncoding | None = None
        self.train_z: torch.Tensor | None = None
        self.train_y: torch.Tensor | None = None
        self._rng = np.random.default_rng(self.seed)

    # -- inputs -------------------------------------------------------------------------------
    def _features(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``[phi(z_theta), z_x]`` of ``theta (1|m, n_params)``, ``x (m, in_dim)``: ``(m, d)``."""
        assert self.encode is not None and self.theta_norm is not None and self.x_norm is not None
        phi = self.encode(self.theta_norm(theta)).expand(x.shape[0], -1)
        return torch.cat([phi, self.x_norm(x)], dim=-1)

    def _training_rows(self, theta, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.y_norm is not None, "normalisers are set before the rows"
        with torch.no_grad():
            z = self._features(
                torch.from_numpy(theta).to(self.dtype), torch.from_numpy(x).to(self.dtype)
            )
            return z, self.y_norm(torch.from_numpy(y).to(self.dtype))

    def _choose_mode(self, n: int) -> str:
        if self.method == "variational" or self.multitask == "lmc":
            return "variational"
        if self.method == "exact":
            return "exact"
        return "exact" if n <= self.exact_max_rows else "variational"

    # -- models -------------------------------------------------------------------------------
    def _build(self, z: torch.Tensor, y: torch.Tensor) -> None:
        """New model and likelihood; inducing points start at random rows of ``z``."""
        n_tasks = self.out_dim
        assert n_tasks is not None, "dimensions are set before the model"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if self.mode == "exact":
                self.likelihood = gpytorch.likelihoods.GaussianLikelihood(
                    batch_shape=torch.Size([n_tasks])
                )
                self.model = BatchExactGP(*self._batch_rows(z, y), self.likelihood, self.kernel)
            else:
                lmc = self._lmc
                if lmc:
                    self.likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(
                        num_tasks=n_tasks
                    )
                else:
                    self.likelihood = gpytorch.likelihoods.GaussianLikelihood(
                        batch_shape=torch.Size([n_tasks])
                    )
                n_latents = (self.n_latents or min(n_tasks, 4)) if lmc else n_tasks
                pick = torch.from_numpy(
                    self._rng.choice(len(z), min(self.num_inducing, len(z)), replace=False)
                )
                inducing = z[pick].expand(n_latents, -1, -1).clone()
                self.model = BatchVariationalGP(inducing, n_tasks, self.kernel, lmc)
        self.model.to(self.dtype)
        self.likelihood.to(self.dtype)

    @property
    def _lmc(self) -> bool:
        return self.mode == "variational" and self.multitask == "lmc"

    def _batch_rows(self, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``(n, d)``, ``(n, T)`` as a batch of independent GPs, ``(T, n, d)``, ``(T, n)``;
        unchanged for the LMC, whose distribution is over ``(n, T)``."""
        if self._lmc:
            return z, y
        assert self.out_dim is not None, "fitted"
        return z.expand(self.out_dim, *z.shape), y.T.contiguous()

    def _init_hyperparameters(self, z: torch.Tensor) -> None:
        # Lengthscales start at the spread of each column times sqrt(d): smooth over the data
        # at first, whatever the column's scale (a trust region spans a small part of the
        # bounds), then shrunk by the likelihood where the response needs it.
        spread = z.std(dim=0).clamp_min(1e-3) * math.sqrt(z.shape[-1])
        assert self.model is not None and self.likelihood is not None, "built first"
        base = self.model.covar_module.base_kernel
        base.lengthscale = spread.expand_as(base.lengthscale)
        self.model.covar_module.outputscale = torch.ones_like(self.model.covar_module.outputscale)
        self.likelihood.noise = torch.full_like(self.likelihood.noise, 1e-2)
        if self._lmc:
            self.likelihood.task_noises = torch.full_like(self.likelihood.task_noises, 1e-2)

    def _set_trainable(self, flag: bool) -> None:
        assert self.model is not None and self.likelihood is not None, "built first"
        for p in [*self.model.parameters(), *self.likelihood.parameters()]:
            p.requires_grad_(flag)

    def _train(self, steps: int, lr: float) -> list[float]:
        """Adam on the negative marginal likelihood (exact) or ELBO (variational)."""
        assert self.model is not None and self.likelihood is not None, "built first"
        assert self.train_z is not None and self.train_y is not None, "rows stored first"
        self._set_trainable(True)
        self.model.train()
        self.likelihood.train()
        params = list(self.model.parameters()) + list(self.likelihood.parameters())
        params = list({id(p): p for p in params}.values())  # the exact GP owns its likelihood too
        optimizer = torch.optim.Adam(params, lr=lr)
        losses: list[float] = []
        n = len(self.train_z)
        if self.mode == "exact":
            mll = gpytorch.mlls.ExactMarginalLogLikelihood(self.likelihood, self.model)
        else:
            mll = gpytorch.mlls.VariationalELBO(self.likelihood, self.model, num_data=n)
        generator = torch.Generator().manual_seed(int(self._rng.integers(2**31)))
        with gpytorch.settings.max_cholesky_size(_CHOLESKY_ALWAYS):
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                if self.mode == "exact":
                    z, y = self._batch_rows(self.train_z, self.train_y)
                else:
                    rows = torch.randint(n, (min(self.batch_size, n),), generator=generator)
                    z, y = self._batch_rows(self.train_z[rows], self.train_y[rows])
                loss = -mll(self.model(z), y).sum()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        self._set_trainable(False)
        self.model.eval()
        self.likelihood.eval()
        return losses

    def _defaults(self) -> tuple[int, int, float]:
        exact = self.mode == "exact"
        fit_steps = self.fit_steps or (150 if exact else 1000)
        update_steps = self.update_steps or (50 if exact else 200)
        lr = self.lr or (0.1 if exact else 0.02)
        return fit_steps, update_steps, lr

    def _select_rows(self, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "exact" and len(z) > self.exact_max_rows:
            keep = torch.from_numpy(
                np.sort(self._rng.choice(len(z), self.exact_max_rows, replace=False))
            )
            return z[keep], y[keep]
        return z, y

    # -- the protocol ---------------------------------------------------------------------------
    def fit(
        self, theta: np.ndarray, x: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None
    ) -> GPSurrogate:
        """Fit hyperparameters (and variational parameters) from scratch. ``groups`` is
        accepted for the protocol and unused: the likelihood needs no hold-out."""
        self.n_params = self.in_dim = self.out_dim = None
        theta, x, y, _ = self._check_rows(theta, x, y, groups)
        self.n_params, self.in_dim, self.out_dim = theta.shape[1], x.shape[1], y.shape[1]
        self._rng = np.random.default_rng(self.seed)
        self.theta_norm = AffineNormalizer.for_theta(
            theta, self.theta_low, self.theta_high, self.periodic_mask(), self.theta_frame
        ).to(self.dtype)
        self.x_norm = AffineNormalizer.from_data(x).to(self.dtype)
        self.y_norm = AffineNormalizer.from_data(y).to(self.dtype)
        self.encode = PeriodicEncoding(self.periodic_mask())
        self.mode = self._choose_mode(len(theta))
        z, yz = self._training_rows(theta, x, y)
        self.train_z, self.train_y = self._select_rows(z, yz)
        self._build(self.train_z, self.train_y)
        self._init_hyperparameters(self.train_z)
        fit_steps, _, lr = self._defaults()
        self.last_losses = self._train(fit_steps, lr)
        return self

    def update(
        self,
        theta: np.ndarray,
        x: np.ndarray,
        y: np.ndarray,
        groups: np.ndarray | None = None,
        *,
        steps: int | None = None,
        append: bool = False,
        centre: np.ndarray | None = None,
    ) -> GPSurrogate:
        """Warm-started refit for ``steps`` Adam steps (default ``update_steps``) on these rows
        (or the stored ones plus these with ``append=True``), keeping hyperparameters,
        normalisation and (variational) inducing points. If the row count moves the model
        across ``exact_max_rows``, it is refit from scratch instead. ``centre`` is unused."""
        if not self.is_fitted:
            return self.fit(theta, x, y, groups)
        theta, x, y, _ = self._check_rows(theta, x, y, groups)
        z, yz = self._training_rows(theta, x, y)
        if append and self.train_z is not None:
            assert self.train_y is not None, "rows are stored with their targets"
            z, yz = torch.cat([self.train_z, z]), torch.cat([self.train_y, yz])
        if self._choose_mode(len(z)) != self.mode and self.method == "auto":
            self.mode = self._choose_mode(len(z))
            self.train_z, self.train_y = z, yz
            self._build(z, yz)
            self._init_hyperparameters(z)
            self.last_losses = self._train(self._defaults()[0], self._defaults()[2])
            return self
        self.train_z, self.train_y = self._select_rows(z, yz)
        if self.mode == "exact":
            assert self.model is not None, "fitted"
            self.model.set_train_data(*self._batch_rows(self.train_z, self.train_y), strict=False)
        _, update_steps, lr = self._defaults()
        self.last_losses = self._train(update_steps if steps is None else int(steps), lr)
        return self

    def _posterior(self, z: torch.Tensor):
        assert self.model is not None and self.out_dim is not None, "fitted"
        return self.model(z if self._lmc else z.expand(self.out_dim, *z.shape))

    def _rows(self, values: torch.Tensor) -> torch.Tensor:
        """``(T, m)`` (batch of GPs) or ``(m, T)`` (LMC) as ``(m, T)``."""
        return values if self._lmc else values.T

    def predict_with_uncertainty(
        self, theta: ArrayLike, x: ArrayLike
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and latent standard deviation, each ``(m, out_dim)``."""
        theta, x = self._as_query(theta, x)
        z = self._features(theta, x)
        with (
            gpytorch.settings.fast_pred_var(),
            gpytorch.settings.max_cholesky_size(_CHOLESKY_ALWAYS),
        ):
            posterior = self._posterior(z)
            mean, var = self._rows(posterior.mean), self._rows(posterior.variance)
        assert self.y_norm is not None, "fitted"
        return self.y_norm.inverse(mean), self.y_norm.inverse_std(var.clamp_min(0).sqrt())

    def predict(self, theta: ArrayLike, x: ArrayLike) -> torch.Tensor:
        """Posterior mean ``(m, out_dim)``, differentiable in ``theta`` and ``x``; skips the
        variance computation."""
        theta, x = self._as_query(theta, x)
        z = self._features(theta, x)
        with (
            gpytorch.settings.skip_posterior_variances(),
            gpytorch.settings.max_cholesky_size(_CHOLESKY_ALWAYS),
        ):
            mean = self._rows(self._posterior(z).mean)
        assert self.y_norm is not None, "fitted"
        return self.y_norm.inverse(mean)

    # -- persistence ------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "kernel": self.kernel,
            "method": self.method,
            "multitask": self.multitask,
            "n_latents": self.n_latents,
            "exact_max_rows": self.exact_max_rows,
            "num_inducing": self.num_inducing,
            "fit_steps": self.fit_steps,
            "update_steps": self.update_steps,
            "lr": self.lr,
            "batch_size": self.batch_size,
        }

    def _state(self) -> dict[str, Any]:
        # An exact GP's posterior is its training rows; a variational one needs only its
        # inducing points (in the state dict), so its rows are not saved.
        exact = self.mode == "exact"
        assert self.model is not None and self.likelihood is not None, "fitted"
        assert self.theta_norm is not None and self.x_norm is not None and self.y_norm is not None
        state = self.model.state_dict()
        inducing_shape = (
            None
            if exact
            else list(next(v for k, v in state.items() if k.endswith("inducing_points")).shape)
        )
        return {
            "mode": self.mode,
            "model": state,
            "likelihood": self.likelihood.state_dict(),
            "train_z": self.train_z if exact else None,
            "train_y": self.train_y if exact else None,
            "inducing_shape": inducing_shape,
            "theta_norm": self.theta_norm.state_dict(),
            "x_norm": self.x_norm.state_dict(),
            "y_norm": self.y_norm.state_dict(),
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.theta_norm, self.x_norm, self.y_norm = (
            AffineNormalizer(state[k]["loc"], state[k]["scale"])
            for k in ("theta_norm", "x_norm", "y_norm")
        )
        self.encode = PeriodicEncoding(self.periodic_mask())
        self.mode = state["mode"]
        self.train_z, self.train_y = state["train_z"], state["train_y"]
        if self.mode == "exact":
            self._build(self.train_z, self.train_y)
        else:  # placeholders of the right shape; the state dict overwrites them
            _, n_inducing, d = state["inducing_shape"]
            assert self.out_dim is not None, "load() sets the dimensions first"
            self._build(
                torch.zeros(n_inducing, d, dtype=self.dtype), torch.zeros(n_inducing, self.out_dim)
            )
        assert self.model is not None and self.likelihood is not None, "built just above"
        self.model.load_state_dict(state["model"])
        self.likelihood.load_state_dict(state["likelihood"])
        self._set_trainable(False)
        self.model.eval()
        self.likelihood.eval()
