"""The comparison plots (PNG, matplotlib, no display needed).

Each function takes the rows of ``results.csv`` (dicts) and writes one figure:
accuracy against settings, against the drift or misalignment sweep, the unseen-chip
spread, and accuracy against the error level sigma.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import functools
import operator

import matplotlib.pyplot as plt
import numpy as np


def _methods(rows):
    return list(dict.fromkeys(r["method"] for r in rows if r.get("status") == "ok"))


def _series(rows, method: str, prefix: str):
    """``{x: [values over seeds]}`` from the columns ``PREFIX<x>`` of one method's rows."""
    out: dict = {}
    for r in rows:
        if r["method"] != method or r.get("status") != "ok":
            continue
        for k, v in r.items():
            if k.startswith(prefix) and v not in (None, ""):
                out.setdefault(k[len(prefix) :], []).append(float(v))
    return out


def _line_plot(rows, prefix: str, path: Path, xlabel: str, title: str, parse=float) -> bool:
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for m in _methods(rows):
        ser = _series(rows, m, prefix)
        if not ser:
            continue
        xs = sorted(ser, key=parse)
        mean = [np.mean(ser[x]) for x in xs]
        std = [np.std(ser[x]) for x in xs]
        ax.errorbar([parse(x) for x in xs], mean, yerr=std, marker="o", capsize=3, label=m)
        drawn = True
    if drawn:
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def plot_curves(rows, path: Path) -> bool:
    return _line_plot(
        rows, "curve_", path, "device settings", "accuracy against settings (trained chip)", int
    )


def plot_sigma(rows, path: Path) -> bool:
    return _line_plot(
        rows,
        "sigma_",
        path,
        "fabrication error level sigma",
        "accuracy against error level (chip seed)",
    )


def plot_sweep(rows, path: Path) -> bool:
    """One panel per swept keyword (drift; or rotation, shift, scale)."""
    keys = sorted(
        {k.split("=")[0][len("sweep_") :] for r in rows for k in r if k.startswith("sweep_")}
    )
    if not keys:
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for m in _methods(rows):
            ser = _series(rows, m, f"sweep_{key}=")
            xs = sorted(ser, key=float)
            ax.errorbar(
                [float(x) for x in xs],
                [np.mean(ser[x]) for x in xs],
                yerr=[np.std(ser[x]) for x in xs],
                marker="o",
                capsize=3,
                label=m,
            )
        ax.set_xlabel(key)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("accuracy under post-deployment perturbation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_unseen(rows, path: Path) -> bool:
    data = {
        m: functools.reduce(operator.iadd, _series(rows, m, "unseen_").values(), [])
        for m in _methods(rows)
    }
    data = {m: v for m, v in data.items() if v}
    if not data:
        return False
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(data)), 4))
    ax.boxplot(list(data.values()), tick_labels=list(data), showmeans=True)
    ax.set_ylabel("test accuracy on unseen chips")
    ax.set_title("chip-to-chip spread")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_plots(rows, out: Path) -> list[str]:
    """Write every plot that has data; return the file names written."""
    out = Path(out)
    made = []
    for name, fn in (
        ("curves.png", plot_curves),
        ("sweep.png", plot_sweep),
        ("unseen.png", plot_unseen),
        ("sigma.png", plot_sigma),
    ):
        if fn(rows, out / name):
            made.append(name)
    return made
