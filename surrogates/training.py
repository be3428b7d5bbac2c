"""Minibatch Adam training of a stacked ensemble with per-member early stopping.

Each member draws its own minibatches from its own training rows and is scored on its own
held-out settings (:class:`~surrogates.dataset.MemberSplit`). The loss is the *sum* of the
members' mean squared errors, so each member's gradient is what it would be alone; Adam's
per-element scaling then keeps members independent. Early stopping keeps, for every member,
the parameters of its best validation score; the state before the first step is scored too,
so a warm-started update never leaves a member worse on held-out settings than it found it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .dataset import MemberSplit, SettingsDataset


@dataclass
class TrainReport:
    """What one call of :func:`train_ensemble` did."""

    steps: int
    seconds: float
    best_val_mse: list[float] = field(default_factory=list)  # per member, normalised units
    stopped_early: bool = False


def _member_mse(structure: nn.Module, data: SettingsDataset, rows: torch.Tensor) -> torch.Tensor:
    """Mean squared error per member ``(M,)`` on ``rows (M, S, K)``, ``K`` rows of each of
    ``S`` settings (so ``theta`` is gathered once per setting)."""
    pred = structure(data.theta[rows[..., :1]], data.x[rows])
    return ((pred - data.y[rows]) ** 2).mean(dim=tuple(range(1, rows.ndim + 1)))


def validation_mse(
    structure: nn.Module, data: SettingsDataset, split: MemberSplit, chunk: int = 1024
) -> torch.Tensor:
    """Per-member MSE ``(M,)`` on each member's held-out rows ``(M, S, K)``, about ``chunk``
    rows at a time."""
    val_idx = split.val_idx
    assert val_idx is not None, "the split holds no settings out"
    per = max(1, chunk // val_idx.shape[2])
    total: torch.Tensor | None = None
    with torch.no_grad():
        for start in range(0, val_idx.shape[1], per):
            rows = val_idx[:, start : start + per]
            part = _member_mse(structure, data, rows) * rows.shape[1]
            total = part if total is None else total + part
    assert total is not None, "the split holds at least one setting out"
    return total / val_idx.shape[1]


def train_ensemble(
    structure: nn.Module,
    data: SettingsDataset,
    split: MemberSplit,
    optimizer: torch.optim.Optimizer,
    *,
    steps: int,
    n_settings: int,
    rows_per_setting: int,
    eval_every: int,
    patience: int,
    generator: torch.Generator,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> TrainReport:
    """Run up to ``steps`` Adam steps; stop once no member improved for ``patience``
    evaluations; restore each member's best parameters. Every parameter of ``structure``
    must have the member dimension first."""
    t0 = time.perf_counter()
    params = dict(structure.named_parameters())
    validate = split.val_idx is not None
    # A structure may define penalty(scale (M,) | None): a regulariser added to the loss.
    penalty = getattr(structure, "penalty", None)
    if validate:
        best = validation_mse(structure, data, split)
        best_state = {k: p.detach().clone() for k, p in params.items()}
        stale = torch.zeros_like(best, dtype=torch.long)
    step = 0
    stopped = False
    for step in range(1, steps + 1):
        rows = split.sample(n_settings, rows_per_setting, generator)
        loss = _member_mse(structure, data, rows).sum()
        if penalty is not None:
            # Scaled by each member's held-out RMS error (normalised units), an estimate of
            # the noise it fits against: a lasso's weight grows with the noise level.
            loss = loss + penalty(best.sqrt() if validate else None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if validate and (step % eval_every == 0 or step == steps):
            score = validation_mse(structure, data, split)
            better = score < best
            if bool(better.any()):
                with torch.no_grad():
                    for k, p in params.items():
                        best_state[k][better] = p.detach()[better]
                best = torch.where(better, score, best)
            stale = torch.where(better, torch.zeros_like(stale), stale + 1)
            if bool((stale >= patience).all()):
                stopped = True
                break
    if validate:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(best_state[k])
        best_list = best.tolist()
    else:
        best_list = []
    return TrainReport(step, time.perf_counter() - t0, best_list, stopped)
