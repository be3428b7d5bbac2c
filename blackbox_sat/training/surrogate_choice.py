"""Surrogate selection: which family, fitted on what, refitted how.

``surrogate=auto`` fits every candidate family (:func:`candidate_families`) on the initial
queries and keeps the one that best predicts the ``theta``-driven change of the output on
held-out *settings* (:func:`paired_delta_r2`), because training uses the surrogate's
``theta``-gradient only. ``fit-surrogate`` scores a fitted family with the same
:func:`heldout_scores`. Refit budgets per family: :data:`REFIT_BY_FAMILY`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch

import surrogates
from surrogates.registry import family_options

from .context import TrainContext


def _family(kind: str, **overrides: Any) -> Any:
    """A field defaulting to ``kind``'s options with ``overrides``."""
    return field(default_factory=lambda: replace(family_options(kind)(), **overrides))


@dataclass(frozen=True)
class SurrogateConfig:
    """Which surrogate family, and each family's options (``surrogate.hyper.max_steps=...``)."""

    SCALAR_FIELD: ClassVar[str] = "family"  # ``--set surrogate=gp`` sets the family
    family: str = "auto"
    candidates: tuple[str, ...] = ("hyper", "interferometric", "interferometric-layers", "gp")
    gp_max_params: int = 50
    # 3 members and a first fit of at most 3000 steps, for time: the loop refits anyway
    # (docs/experiments.md, "Pipeline design choices").
    hyper: Any = _family("hyper", n_members=3, max_steps=3000)  # noqa: RUF009 (frozen)
    hyper_additive: Any = _family("hyper-additive", n_members=3)  # noqa: RUF009 (frozen)
    mlp: Any = _family("mlp", n_members=3)  # noqa: RUF009 (frozen)
    interferometric: Any = _family("interferometric")  # noqa: RUF009 (frozen)
    interferometric_layers: Any = _family("interferometric-layers")  # noqa: RUF009 (frozen)
    gp: Any = _family("gp")  # noqa: RUF009 (frozen)

    def __post_init__(self) -> None:
        kinds = set(surrogates.surrogate_kinds())
        for name in (self.family, *self.candidates):
            if name != "auto" and name not in kinds:
                raise ValueError(
                    f"unknown surrogate family {name!r}; known: auto, {', '.join(sorted(kinds))}"
                )

    def options(self, kind: str) -> dict[str, Any]:
        """``kind``'s constructor keywords that differ from the family's own defaults."""
        chosen, default = getattr(self, kind.replace("-", "_")), family_options(kind)()
        return {k: v for k, v in asdict(chosen).items() if v != getattr(default, k)}


# Refit budget per surrogate family, used where ``refit_steps`` / ``refit_window`` are None
# (the default; a number set by the user wins). The interferometric family is a first-order
# expansion around its centre, so it needs recent data and more steps to re-fit after the
# centre moves (mzi ``blackbox-sat``, seeds 0-2 in ``compare``: 46.9 +- 2.5 with 200 steps on
# 300 settings against 37.1 +- 1.4 with the neural families' 100 on 500; 400 steps gave
# 0.368 against 0.442 on seed 0).
#: Families that model the parameters as phases of optical shifters: ``auto`` offers them only
#: where some parameters are periodic.
PHASE_FAMILIES = ("interferometric", "interferometric-layers")

REFIT_BY_FAMILY = {
    "default": {"refit_steps": 100, "refit_window": 500},
    "interferometric": {"refit_steps": 200, "refit_window": 300},
    # Global, so nothing to re-learn after a move: 100 steps (mzi seeds 0 / 1: 0.626 / 0.434,
    # 5 min per run) did as well as 200 (0.556 / 0.520, 9 min).
    "interferometric-layers": {"refit_steps": 100, "refit_window": 300},
}


def refit_plan(cfg: Any, family: str) -> tuple[int, int]:
    """``(refit_steps, refit_window)`` for ``family``: the user's numbers (``cfg``, a pipeline
    configuration), else the family's."""
    rule = REFIT_BY_FAMILY.get(family, REFIT_BY_FAMILY["default"])
    return (
        cfg.refit_steps if cfg.refit_steps is not None else rule["refit_steps"],
        cfg.refit_window if cfg.refit_window is not None else rule["refit_window"],
    )


class Dataset:
    """Every good query so far, as per-sample rows for the surrogate."""

    def __init__(self):
        self.theta, self.x, self.y, self.groups, self._next = [], [], [], [], 0

    def add(self, theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
        b = len(x)
        self.theta.append(np.broadcast_to(theta, (b, theta.size)))
        self.x.append(np.asarray(x))
        self.y.append(np.asarray(y))
        self.groups.append(np.full(b, self._next))
        self._next += 1

    def arrays(self, last: int | None = None):
        """All rows, or those of the ``last`` settings measured."""
        sl = slice(-last, None) if last else slice(None)
        return (
            np.concatenate(self.theta[sl]),
            np.concatenate(self.x[sl]),
            np.concatenate(self.y[sl]),
            np.concatenate(self.groups[sl]),
        )


def candidate_families(ctx: TrainContext, cfg: Any) -> list[str]:
    """The families ``auto`` tries. The interferometric ones only where parameters are
    phases (periodic); ``hyper-additive`` only where some are not (periodic columns get no
    per-control path, so it would repeat ``hyper``); the GP only for small parameter counts,
    where it is practical."""
    fams = []
    for f in cfg.surrogate.candidates:
        if f in PHASE_FAMILIES and not ctx.info.periodic.any():
            continue
        if f == "hyper-additive" and ctx.info.periodic.all():
            continue
        if f == "gp" and ctx.info.n_params > cfg.surrogate.gp_max_params:
            continue
        fams.append(f)
    return fams


def _new_surrogate(kind: str, ctx: TrainContext):
    kw = ctx.config.surrogate.options(kind)
    # without finite bounds the surrogate normalises theta by its data instead
    bounded = bool(np.all(np.isfinite(ctx.info.low) & np.isfinite(ctx.info.high)))
    return surrogates.make_surrogate(
        kind,
        theta_low=ctx.info.low if bounded else None,
        theta_high=ctx.info.high if bounded else None,
        periodic=ctx.info.periodic,
        seed=ctx.seed,
        **kw,
    )


def paired_delta_r2(pred: np.ndarray, y: np.ndarray, x: np.ndarray) -> float:
    """Held-out R² of the ``theta``-driven part of the output, from measurements alone.

    Rows that share an input ``x`` but come from different settings are paired, and the
    predicted differences ``f(theta_a, x) - f(theta_b, x)`` are scored against the measured
    ones. A model that ignores ``theta`` scores about 0, however well it predicts ``y``.
    ``pred``, ``y``: ``(n, out_dim)``; ``x``: ``(n, in_dim)``. NaN when no input repeats.
    """
    _, key = np.unique(x, axis=0, return_inverse=True)
    order = np.argsort(key.ravel(), kind="stable")
    k = key.ravel()[order]
    a, b = order[:-1][k[:-1] == k[1:]], order[1:][k[:-1] == k[1:]]
    if len(a) == 0:
        return float("nan")
    d_true, d_pred = y[a] - y[b], pred[a] - pred[b]
    return float(1 - ((d_pred - d_true) ** 2).sum() / (d_true**2).sum())


def heldout_scores(model, theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """A fitted surrogate's held-out ``r2`` and ``rmse`` of the output, and ``delta_r2``
    (:func:`paired_delta_r2`) of its ``theta``-driven change; ``theta (n, P)``, ``x (n, D)``,
    ``y (n, O)`` are rows of settings it was not fitted on. Shared by the pipeline's
    selection and ``fit-surrogate``, so both rank families the same way."""
    with torch.no_grad():
        pred = (
            model.predict(
                torch.as_tensor(theta, dtype=torch.float32),
                torch.as_tensor(x, dtype=torch.float32),
            )
            .double()
            .numpy()
        )
    sq = (pred - y) ** 2
    return {
        "r2": float(1 - sq.mean(axis=0).sum() / y.var(axis=0).sum()),
        "rmse": float(np.sqrt(sq.sum() / y.size)),
        "delta_r2": paired_delta_r2(pred, y, x),
    }


def select_surrogate(ctx: TrainContext, data: Dataset, cfg: Any) -> tuple[object, dict]:
    """Fit the candidates on the initial queries; keep the best on held-out settings.

    The score is :func:`paired_delta_r2`, the part of the output that ``theta`` changes,
    because training uses the surrogate's ``theta``-gradient only (the measured outputs give
    the rest). Ranking by plain output error picked ``mlp`` on mzi, whose gradients were the
    worst there (docs/experiments.md#surrogate-quality-on-mzi)."""
    theta, x, y, groups = data.arrays()
    fams = (
        [cfg.surrogate.family] if cfg.surrogate.family != "auto" else candidate_families(ctx, cfg)
    )
    if len(fams) == 1:
        return _new_surrogate(fams[0], ctx).fit(theta, x, y, groups), {"chosen": fams[0]}
    rng = np.random.default_rng([ctx.seed, 77])
    ids = np.unique(groups)
    held = rng.choice(ids, max(2, len(ids) // 5), replace=False)
    test = np.isin(groups, held)
    scores, r2 = {}, {}
    for fam in fams:
        model = _new_surrogate(fam, ctx).fit(theta[~test], x[~test], y[~test], groups[~test])
        score = heldout_scores(model, theta[test], x[test], y[test])
        r2[fam] = score["r2"]
        scores[fam] = score["delta_r2"] if np.isfinite(score["delta_r2"]) else r2[fam]
    best = max(scores, key=scores.__getitem__)
    # A fresh fit on all settings, not a warm refit of the held-out model: on mzi (seeds 0 / 1,
    # side by side) the warm refit saved 14-20 % of the run's time but gave 0.412 / 0.398
    # against 0.442 / 0.502.
    return _new_surrogate(best, ctx).fit(theta, x, y, groups), {
        "chosen": best,
        "heldout_delta_r2": scores,
        "heldout_r2": r2,
    }
