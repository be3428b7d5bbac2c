"""Deep-ensemble neural surrogates.

:class:`EnsembleSurrogate` trains ``n_members`` networks of one family
(:mod:`surrogates.structures`) at once, with stacked weights (:mod:`surrogates.ensemble`),
Adam on minibatches and early stopping on held-out settings (:mod:`surrogates.training`).
Members differ by initialisation, minibatch order and held-out settings. The prediction is
the members' mean; the uncertainty their standard deviation (epistemic only: measurement
noise is not modelled).

Five members is the default: the ensemble mean's error falls roughly as ``1/M`` in the
variance part, and five is where the spread becomes a usable uncertainty at an acceptable
cost (training time grows linearly in ``M``).

Cost: a step draws ``batch_size`` rows per member, so its time does not depend on the number
of rows; fit time is the number of steps (early stopping, at most ``max_steps``) times that.
Measured on a 160-parameter microring-like device (16 inputs, 10 outputs, trust region 0.05,
64 inputs per setting; one CPU thread on a shared machine), default ``"hyper"``:

| settings (rows) | fit | steps | theta-part R^2 | loss-gradient cosine at the centre |
|---|---|---|---|---|
| 250 (16k) | 43 s | 2750 | 0.888 | 0.973 |
| 500 (32k) | 23 s | 2400 | 0.958 | 0.996 |
| 1000 (64k) | 29 s | 3000 | 0.975 | 0.998 |

A warm :meth:`~EnsembleSurrogate.update` of 100 steps took 1.0-1.1 s on 50k rows and
1.3-1.6 s on 256k rows; the gradient of a loss through :meth:`~EnsembleSurrogate.predict`
(``theta (160,)``, 128 inputs) 2 ms. On a shared 2-core host, two torch threads were at
times 2-25 times slower than one (OpenMP threads spinning against other processes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from .base import SurrogateBase
from .dataset import MemberSplit, SettingsDataset
from .normalize import AffineNormalizer
from .protocol import ArrayLike
from .structures import STRUCTURES, ThetaShiftable
from .training import TrainReport, train_ensemble


class EnsembleSurrogate(SurrogateBase):
    """Deep ensemble of one network family, chosen by name.

    Args:
        structure: ``"hyper"`` (default, :class:`~surrogates.structures.HyperStructure`) or
            ``"mlp"`` (:class:`~surrogates.structures.MLPStructure`).
        n_members: ensemble size ``M`` (default 5).
        structure_kw: keywords of the structure (``rank``, ``width``, ``hidden``...).
        lr: Adam learning rate of :meth:`fit` (default 1e-2), cosine-decayed to ``lr/10`` over
            ``max_steps``.
        update_lr: constant learning rate of :meth:`update` (default ``lr/3``).
        batch_size: rows per member per step, drawn as ``batch_size // rows_per_setting``
            settings times ``rows_per_setting`` inputs of each.
        rows_per_setting: inputs drawn per setting in a minibatch (default 4; capped by the
            median number of rows per setting). A structure's ``theta`` path is computed once
            per setting, so this divides its cost, at the price of fewer settings per step.
        max_steps: step limit of :meth:`fit` (early stopping usually ends it sooner).
        update_steps: steps of :meth:`update` when ``steps`` is not given (default 100).
        eval_every, patience: validation cadence in steps and its patience in evaluations.
        holdout_fraction: fraction of settings each member holds out (at least one;
            no hold-out below 5 settings).
        max_holdout_rows: held-out rows scored per member per evaluation.
        weight_decay: decoupled weight decay (AdamW).
        theta_low, theta_high, periodic, seed, dtype: see :class:`~surrogates.base.SurrogateBase`.
    """

    #: Whether ``x`` is centred by its mean. Models linear in an input field need ``0`` kept.
    centre_inputs: bool = True

    def __init__(
        self,
        structure: str = "hyper",
        n_members: int = 5,
        *,
        structure_kw: dict[str, Any] | None = None,
        lr: float = 1e-2,
        update_lr: float | None = None,
        batch_size: int = 256,
        rows_per_setting: int = 4,
        max_steps: int = 3000,
        update_steps: int = 100,
        eval_every: int = 50,
        patience: int = 6,
        holdout_fraction: float = 0.1,
        max_holdout_rows: int = 2048,
        weight_decay: float = 0.0,
        **base_kw,
    ):
        super().__init__(**base_kw)
        self.structure_name = structure
        self.n_members = int(n_members)
        self.structure_kw = dict(structure_kw or {})
        self.lr, self.update_lr = (
            float(lr),
            (float(lr) / 3 if update_lr is None else float(update_lr)),
        )
        self.batch_size, self.rows_per_setting = int(batch_size), int(rows_per_setting)
        self.max_steps, self.update_steps = int(max_steps), int(update_steps)
        self.eval_every, self.patience = int(eval_every), int(patience)
        self.holdout_fraction, self.max_holdout_rows = (
            float(holdout_fraction),
            int(max_holdout_rows),
        )
        self.weight_decay = float(weight_decay)
        self.model: nn.Module | None = None
        self.theta_norm: AffineNormalizer | None = None
        self.x_norm: AffineNormalizer | None = None
        self.y_norm: AffineNormalizer | None = None
        self.data: SettingsDataset | None = None
        self.last_report: TrainReport | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._n_updates = 0
        self._generator = torch.Generator().manual_seed(self.seed)

    # -- construction ----------------------------------------------------------------------
    def _structure_class(self) -> Callable[..., nn.Module]:
        if self.structure_name not in STRUCTURES:
            raise ValueError(
                f"unknown structure {self.structure_name!r}; known: {sorted(STRUCTURES)}"
            )
        return STRUCTURES[self.structure_name]

    def _build_model(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = self._structure_class()(
                self.n_members,
                self.n_params,
                self.in_dim,
                self.out_dim,
                self.periodic_mask(),
                **self.structure_kw,
            )
        return model.to(self.dtype)

    def _make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        # The fused kernel does Adam's element-wise work in one pass: with ~10^5-10^6
        # parameters it is a sizeable share of a step on a CPU.
        assert self.model is not None, "the model is built before its optimizer"
        return torch.optim.AdamW(
            self.model.parameters(), lr=lr, weight_decay=self.weight_decay, fused=True
        )

    def _set_trainable(self, flag: bool) -> None:
        # Frozen outside training, so that predict() records no graph towards the weights and
        # autograd.grad(loss, theta) costs only the path to theta.
        assert self.model is not None, "fitted"
        for p in self.model.parameters():
            p.requires_grad_(flag)

    def _dataset(self, theta, x, y, groups) -> SettingsDataset:
        assert self.theta_norm is not None and self.x_norm is not None and self.y_norm is not None
        with torch.no_grad():
            t = self.theta_norm(torch.from_numpy(theta).to(self.dtype))
            xs = self.x_norm(torch.from_numpy(x).to(self.dtype))
            ys = self.y_norm(torch.from_numpy(y).to(self.dtype))
        return SettingsDataset(t, xs, ys, groups)

    def _split(self, data: SettingsDataset) -> MemberSplit:
        rng = np.random.default_rng([self.seed, self._n_updates])
        return MemberSplit.by_settings(
            data.groups, self.n_members, self.holdout_fraction, self.max_holdout_rows, rng
        )

    # -- fitting ------------------------------------------------------------------------------
    def fit(
        self, theta: np.ndarray, x: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None
    ) -> EnsembleSurrogate:
        """Fit from scratch (new normalisation, new weights) for up to ``max_steps`` steps."""
        self.n_params = self.in_dim = self.out_dim = None
        theta, x, y, groups = self._check_rows(theta, x, y, groups)
        self.n_params, self.in_dim, self.out_dim = theta.shape[1], x.shape[1], y.shape[1]
        self.theta_norm = AffineNormalizer.for_theta(
            theta, self.theta_low, self.theta_high, self.periodic_mask(), self.theta_frame
        ).to(self.dtype)
        self.x_norm = AffineNormalizer.from_data(x, center=self.centre_inputs).to(self.dtype)
        self.y_norm = AffineNormalizer.from_data(y).to(self.dtype)
        self._n_updates = 0
        self._generator.manual_seed(self.seed)
        self.model = self._build_model()
        self.data = self._dataset(theta, x, y, groups)
        self._initialise(self.data)
        self._optimizer = self._make_optimizer(self.lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self._optimizer, self.max_steps, eta_min=self.lr / 10
        )
        self._train(self.training_data(), self.max_steps, scheduler)
        return self

    def _initialise(self, data: SettingsDataset) -> None:
        """Hook for families that set their first weights (or a centre) from the normalised rows."""

    def training_data(self) -> SettingsDataset:
        """The rows the next training run uses (all stored rows; families may select)."""
        assert self.data is not None, "fitted"
        return self.data

    def _train(self, data: SettingsDataset, steps: int, scheduler=None) -> TrainReport:
        split = self._split(data)
        rows_per_setting = int(max(1, min(self.rows_per_setting, np.median(split.counts.numpy()))))
        model, optimizer = self.model, self._optimizer
        assert model is not None and optimizer is not None, "built before training"
        self._set_trainable(True)
        model.train()
        try:
            self.last_report = train_ensemble(
                model,
                data,
                split,
                optimizer,
                steps=steps,
                n_settings=max(1, self.batch_size // rows_per_setting),
                rows_per_setting=rows_per_setting,
                eval_every=min(self.eval_every, max(steps // 2, 1)),
                patience=self.patience,
                generator=self._generator,
                scheduler=scheduler,
            )
        finally:
            self._set_trainable(False)
            model.eval()
        return self.last_report

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
    ) -> EnsembleSurrogate:
        """Warm-started refit for ``steps`` (default ``update_steps`` = 100) Adam steps at
        ``update_lr``, keeping weights, normalisation scale and optimizer state.

        With ``append=False`` the given rows replace the stored ones (pass all data, or only
        the newest trust-region data); with ``append=True`` they are added to them. Fits from
        scratch if the surrogate was never fit. With ``centre`` (``(n_params,)``, the current
        training point), the model is first re-centred there (:meth:`recentre`).
        """
        if not self.is_fitted:
            return self.fit(theta, x, y, groups)
        theta, x, y, groups = self._check_rows(theta, x, y, groups)
        if not append:
            self.data = None  # replaced below: spares re-centring rows about to be dropped
        self._before_update(centre)
        new = self._dataset(theta, x, y, groups)
        self.data = self.data.concat(new) if append and self.data is not None else new
        self._n_updates += 1
        self._after_data(new)
        if self._optimizer is None:
            self._optimizer = self._make_optimizer(self.update_lr)
        for group in self._optimizer.param_groups:
            group["lr"] = self.update_lr
        self._train(self.training_data(), self.update_steps if steps is None else int(steps))
        return self

    def _after_data(self, new: SettingsDataset) -> None:
        """Hook run once the ``new`` rows are stored, before the warm refit."""

    def _before_update(self, centre: np.ndarray | None) -> None:
        """Hook run before the new rows are normalised and stored."""
        if centre is not None:
            self.recentre(centre)

    def recentre(self, centre: np.ndarray) -> None:
        """Move the origin of the normalised non-periodic ``theta`` columns to ``centre``
        (``(n_params,)``, ``theta`` units), refolding the shift into the first layers so that
        predictions are unchanged (up to rounding). Keeps the inputs the networks see near
        unit scale as training walks ``theta`` away from where the surrogate was first fit;
        the stored rows are re-normalised accordingly."""
        assert self.theta_norm is not None, "fitted"
        assert isinstance(self.model, ThetaShiftable), "the structure can shift its theta origin"
        plain = torch.as_tensor(~self.periodic_mask())
        new_loc = torch.as_tensor(np.asarray(centre, np.float64)).to(self.dtype)
        shift = torch.where(plain, (new_loc - self.theta_norm.loc) / self.theta_norm.scale, 0.0)
        self.model.shift_theta(shift[plain])
        with torch.no_grad():
            self.theta_norm.loc.copy_(torch.where(plain, new_loc, self.theta_norm.loc))
            if self.data is not None:
                self.data.theta -= shift

    # -- prediction ---------------------------------------------------------------------------
    def member_predictions(self, theta: ArrayLike, x: ArrayLike) -> torch.Tensor:
        """Every member's prediction ``(M, m, out_dim)`` in output units."""
        theta, x = self._as_query(theta, x)
        assert self.model is not None and self.theta_norm is not None
        assert self.x_norm is not None and self.y_norm is not None
        z = self.model(self.theta_norm(theta).unsqueeze(0), self.x_norm(x).unsqueeze(0))
        return self.y_norm.inverse(z)

    def predict(self, theta: ArrayLike, x: ArrayLike) -> torch.Tensor:
        """Ensemble mean ``(m, out_dim)``, differentiable in ``theta`` and ``x``."""
        return self.member_predictions(theta, x).mean(dim=0)

    def predict_with_uncertainty(
        self, theta: ArrayLike, x: ArrayLike
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ensemble mean and member standard deviation, each ``(m, out_dim)``."""
        members = self.member_predictions(theta, x)
        return members.mean(dim=0), members.std(dim=0, correction=1 if self.n_members > 1 else 0)

    # -- persistence ----------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "structure": self.structure_name,
            "n_members": self.n_members,
            "structure_kw": self.structure_kw,
            "lr": self.lr,
            "update_lr": self.update_lr,
            "batch_size": self.batch_size,
            "rows_per_setting": self.rows_per_setting,
            "max_steps": self.max_steps,
            "update_steps": self.update_steps,
            "eval_every": self.eval_every,
            "patience": self.patience,
            "holdout_fraction": self.holdout_fraction,
            "max_holdout_rows": self.max_holdout_rows,
            "weight_decay": self.weight_decay,
        }

    def _state(self) -> dict[str, Any]:
        assert self.model is not None and self.theta_norm is not None
        assert self.x_norm is not None and self.y_norm is not None
        return {
            "model": self.model.state_dict(),
            "theta_norm": self.theta_norm.state_dict(),
            "x_norm": self.x_norm.state_dict(),
            "y_norm": self.y_norm.state_dict(),
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        norms = []
        for key in ("theta_norm", "x_norm", "y_norm"):
            norms.append(AffineNormalizer(state[key]["loc"], state[key]["scale"]))
        self.theta_norm, self.x_norm, self.y_norm = norms
        self.model = self._build_model()
        self.model.load_state_dict(state["model"])
        self._set_trainable(False)
        self.model.eval()
