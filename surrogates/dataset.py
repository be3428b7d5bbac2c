"""Measured rows as normalised tensors, grouped by setting, with per-member hold-out splits.

Early stopping must hold out whole *settings*, not rows: rows of one setting share ``theta``,
so a model that memorises settings would look perfect on held-out rows of seen settings
while knowing nothing about ``theta``. Each ensemble member holds out its own random subset
of settings, so together the members still see every setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def dense_groups(labels: np.ndarray) -> np.ndarray:
    """Any ``(n,)`` labels mapped to ``0..G-1`` in order of first appearance, so that the same
    partition of rows gets the same ids however it is labelled."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.ravel()]


def groups_from_theta(theta: np.ndarray) -> np.ndarray:
    """Setting ids ``(n,)`` in ``0..G-1``: rows with bit-identical ``theta (n, n_params)``
    share an id."""
    theta = np.ascontiguousarray(np.asarray(theta, dtype=np.float64))
    # One opaque bytes value per row makes np.unique a 1-d sort instead of a lexsort.
    return dense_groups(
        theta.view(np.dtype((np.void, theta.dtype.itemsize * theta.shape[1]))).ravel()
    )


@dataclass
class SettingsDataset:
    """Normalised rows: ``theta (n, n_params)``, ``x (n, in_dim)``, ``y (n, out_dim)`` and
    dense setting ids ``groups (n,)``."""

    theta: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    groups: np.ndarray

    def __len__(self) -> int:
        return int(self.theta.shape[0])

    @property
    def n_groups(self) -> int:
        return int(self.groups.max()) + 1 if len(self.groups) else 0

    def concat(self, other: SettingsDataset) -> SettingsDataset:
        """Rows of both; ``other``'s settings get new ids (they are other measurements)."""
        return SettingsDataset(
            torch.cat([self.theta, other.theta]),
            torch.cat([self.x, other.x]),
            torch.cat([self.y, other.y]),
            np.concatenate([self.groups, other.groups + self.n_groups]),
        )

    def subset(self, rows: np.ndarray) -> SettingsDataset:
        rows_t = torch.as_tensor(rows, dtype=torch.long)
        return SettingsDataset(
            self.theta[rows_t], self.x[rows_t], self.y[rows_t], dense_groups(self.groups[rows])
        )


@dataclass
class MemberSplit:
    """Per-member training settings and a fixed validation sample.

    Training minibatches are drawn as settings, then rows within each setting, so that a
    structure computes its ``theta`` path once per setting. ``train_groups (M, G_max)`` holds
    each member's training setting ids, padded by repetition; only the first
    ``n_train[m]`` are drawn. ``order``/``starts``/``counts`` locate the rows of each setting.
    ``val_idx (M, S, K)`` holds ``K`` rows of each of ``S`` held-out settings per member, or is
    ``None`` when there are too few settings to hold any out. Grouped by setting so that
    scoring, like training, computes a structure's ``theta`` path once per setting: scored
    row by row, validation took a tenth of a ``blackbox-sat`` run on ``mrr``.
    """

    train_groups: torch.Tensor
    n_train: torch.Tensor
    order: torch.Tensor
    starts: torch.Tensor
    counts: torch.Tensor
    val_idx: torch.Tensor | None

    @classmethod
    def by_settings(
        cls,
        groups: np.ndarray,
        n_members: int,
        holdout_fraction: float,
        max_val_rows: int,
        rng: np.random.Generator,
        min_groups: int = 5,
    ) -> MemberSplit:
        """Each member holds out ``ceil(holdout_fraction * G)`` random settings, or none when
        there are fewer than ``min_groups`` settings (early stopping then has no signal)."""
        n_groups = int(groups.max()) + 1
        order = np.argsort(groups, kind="stable")
        counts = np.bincount(groups, minlength=n_groups)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        layout = (torch.from_numpy(order), torch.from_numpy(starts), torch.from_numpy(counts))
        if n_groups < min_groups or holdout_fraction <= 0:
            train = torch.arange(n_groups).expand(n_members, n_groups).contiguous()
            return cls(train, torch.full((n_members,), n_groups), *layout, None)
        n_out = max(1, int(np.ceil(holdout_fraction * n_groups)))
        # K rows of each of S held-out settings, S * K <= max_val_rows, all rows when they fit.
        k = int(max(1, min(np.median(counts), max_val_rows // n_out)))
        n_val = int(min(n_out, max(1, max_val_rows // k)))
        train_groups, val_rows = [], []
        for _ in range(n_members):
            held = np.zeros(n_groups, bool)
            held[rng.choice(n_groups, n_out, replace=False)] = True
            train_groups.append(np.flatnonzero(~held))
            val_groups = rng.choice(np.flatnonzero(held), n_val, replace=False)
            # Rows without replacement within a setting (random keys, argsorted), repeated
            # cyclically where a setting has fewer than K.
            c = counts[val_groups][:, None]
            keys = rng.random((n_val, max(int(c.max()), k)))
            keys[np.arange(keys.shape[1])[None, :] >= c] = np.inf
            within = np.argsort(keys, axis=1)[:, :k] % c
            val_rows.append(order[starts[val_groups][:, None] + within])
        n_max = max(len(g) for g in train_groups)
        train = torch.stack([torch.from_numpy(np.resize(g, n_max)) for g in train_groups])
        val_idx = torch.from_numpy(np.stack(val_rows))
        return cls(train, torch.tensor([len(g) for g in train_groups]), *layout, val_idx)

    def sample(
        self, n_settings: int, rows_per_setting: int, generator: torch.Generator
    ) -> torch.Tensor:
        """Row indices ``(M, n_settings, rows_per_setting)``: each member draws settings from
        its own training settings (with replacement), then rows within each (with
        replacement)."""
        n_members = self.train_groups.shape[0]
        u = torch.rand(n_members, n_settings, generator=generator, dtype=torch.float64)
        g = self.train_groups.gather(1, (u * self.n_train[:, None]).long())
        v = torch.rand(
            n_members, n_settings, rows_per_setting, generator=generator, dtype=torch.float64
        )
        within = (v * self.counts[g][..., None]).long()
        return self.order[self.starts[g][..., None] + within]
