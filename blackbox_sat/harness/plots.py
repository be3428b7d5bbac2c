"""The comparison plots (PNG, matplotlib, no display needed).

Each function takes the rows of ``results.csv`` (dicts) and writes one figure:
accuracy against settings, against the drift or misalignment sweep, the unseen-chip
spread, and accuracy against the error level sigma. Every figure shows test accuracy in %
on one 0-100 scale with a dashed chance line (1 / classes), as ``summary.md`` does.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

#: Units of the built-in simulators' post-deployment keywords (docs/protocol.md); another
#: device's keyword is labelled in its own units.
SWEEP_UNITS = {
    "drift": "temperature change, K",
    "rotation": "mask rotation, degrees",
    "shift": "mask shift, pixels",
    "scale": "magnification, x nominal",
}
ACC_LABEL = "test accuracy (%)"


def _accuracy_axis(ax, chance: float | None) -> None:
    """One accuracy scale for every figure (0-100 %), and the chance line."""
    ax.set_ylim(0, 100)
    ax.set_ylabel(ACC_LABEL)
    if chance:
        ax.axhline(
            100 * chance, color="grey", ls="--", lw=1, label=f"chance ({100 * chance:.0f} %)"
        )


def _unperturbed(device: str, key: str):
    """The value of device keyword ``key`` on the trained chip: its factory default."""
    import inspect

    from blackbox_sat.devices.spec import resolve_factory

    try:
        p = inspect.signature(resolve_factory(device)).parameters.get(key)
    except Exception:  # a tcp:// device or an adapter that no longer imports: no point
        return None
    if p is None or isinstance(p.default, bool) or not isinstance(p.default, (int, float)):
        return None
    return float(p.default)


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


def _line_plot(
    rows, prefix: str, path: Path, xlabel: str, title: str, parse=float, chance=None
) -> bool:
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for m in _methods(rows):
        ser = _series(rows, m, prefix)
        if not ser:
            continue
        xs = sorted(ser, key=parse)
        mean = [100 * np.mean(ser[x]) for x in xs]
        std = [100 * np.std(ser[x]) for x in xs]
        ax.errorbar([parse(x) for x in xs], mean, yerr=std, marker="o", capsize=3, label=m)
        drawn = True
    if drawn:
        ax.set_xlabel(xlabel)
        _accuracy_axis(ax, chance)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def plot_curves(rows, path: Path, chance: float | None = None) -> bool:
    return _line_plot(
        rows,
        "curve_",
        path,
        "device settings spent (calls of query; 0 = theta0)",
        "accuracy against settings (trained chip)",
        int,
        chance,
    )


def plot_sigma(rows, path: Path, chance: float | None = None) -> bool:
    return _line_plot(
        rows,
        "sigma_",
        path,
        "fabrication error level sigma (the device's sigma keyword and units; 0 = ideal)",
        "accuracy against error level (chip seed)",
        chance=chance,
    )


def plot_sweep(rows, path: Path, chance: float | None = None) -> bool:
    """One panel per swept keyword (drift; or rotation, shift, scale), each with the
    unperturbed point (the keyword's default, the trained chip's ``acc_chip``)."""
    keys = sorted(
        {k.split("=")[0][len("sweep_") :] for r in rows for k in r if k.startswith("sweep_")}
    )
    if not keys:
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for m in _methods(rows):
            ser = {float(x): v for x, v in _series(rows, m, f"sweep_{key}=").items()}
            base = _unperturbed(next(r["device"] for r in rows if r["method"] == m), key)
            chip = [float(r["acc_chip"]) for r in rows if r["method"] == m and _ok(r)]
            if base is not None and base not in ser and chip:
                ser[base] = chip
            xs = sorted(ser)
            ax.errorbar(
                xs,
                [100 * np.mean(ser[x]) for x in xs],
                yerr=[100 * np.std(ser[x]) for x in xs],
                marker="o",
                capsize=3,
                label=m,
            )
        ax.set_xlabel(f"{key} ({SWEEP_UNITS.get(key, 'device keyword, its own units')})")
        _accuracy_axis(ax, chance)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("accuracy under post-deployment perturbation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_unseen(rows, path: Path, chance: float | None = None) -> bool:
    data: dict[str, list[float]] = {}
    for m in _methods(rows):
        accs = [100 * a for seeds in _series(rows, m, "unseen_").values() for a in seeds]
        if accs:
            data[m] = accs
    if not data:
        return False
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(data)), 4))
    ax.boxplot(list(data.values()), tick_labels=list(data), showmeans=True)
    _accuracy_axis(ax, chance)
    ax.set_ylabel("test accuracy on unseen chips (%)")
    ax.set_xlabel("method (box: unseen chips x training seeds)")
    if chance:
        ax.legend(fontsize=8)
    ax.set_title("chip-to-chip spread")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _ok(row) -> bool:
    return row.get("status") == "ok" and row.get("acc_chip") not in (None, "")


def write_plots(rows, out: Path, chance: float | None = None) -> list[str]:
    """Write every plot that has data; return the file names written. ``chance``: 1 / classes."""
    out = Path(out)
    made = []
    for name, fn in (
        ("curves.png", plot_curves),
        ("sweep.png", plot_sweep),
        ("unseen.png", plot_unseen),
        ("sigma.png", plot_sigma),
    ):
        if fn(rows, out / name, chance):
            made.append(name)
    return made
