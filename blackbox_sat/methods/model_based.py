"""Model-based methods: they train on a simulator's model and use no device settings.

- ``oracle``: exact gradients through this chip's true, noise-free model (the upper bound).
- ``oracle-sat``: the same with SAT: what flatness buys when the model is exact.
- ``offline``: backprop on the nominal (datasheet) model, deployed as-is.
- ``offline-sat``: the same with SAT.
- ``nat``: noise-aware training: each step uses a different random chip drawn from the
  datasheet's error distribution (the simulator's ``sibling`` at other seeds), so the
  result is trained for the error *distribution*, not for this chip.

All share one protocol (docs/protocol.md): Adam on minibatches of 128 from ``theta0``, learning
rate chosen from ``lr_grid`` (in units of the bound width) by validation accuracy on the
model the method trains on, up to ``epochs`` epochs with early stopping on that accuracy.
Parameters are optimised in normalized coordinates ``u = theta / scale``.

``objective=robust`` (``oracle-sat``, ``offline-sat``) favours transfer: SAT at each
of ``ROBUST_RADII``, and the largest radius whose validation accuracy on the model is within
the validation set's standard error of the best radius's (:func:`choose_radius`). A wider
ball is flatter, and flatness that costs no resolvable accuracy is free; where a wide ball
costs accuracy (a ring bank's steep resonances) the rule keeps a small one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from blackbox_sat.optim.sat import SAT, Projector
from blackbox_sat.training.config import RunConfig
from blackbox_sat.training.context import TrainContext

from .registry import MethodResult, register


@dataclass(frozen=True)
class ModelTrainingConfig(RunConfig):
    """The oracle's protocol: learning rates in bound widths, epochs, early-stopping patience."""

    lr_grid: tuple[float, ...] = (0.01, 0.03, 0.1)
    epochs: int = 300
    patience: int = 30
    digital_lr: float = 0.01


@dataclass(frozen=True)
class ModelSatConfig(ModelTrainingConfig):
    rho: float = 0.05  # SAT radius, normalized L2
    adaptive: bool = False  # ASAM: the perturbation scaled by |theta|
    objective: Literal["accuracy", "robust"] = "accuracy"  # robust: radius by choose_radius


#: Radii ``objective=robust`` tries (normalized L2). 0.5 is where the measured transfer of the
#: mesh stops improving (docs/experiments.md, "SAT radius against transfer").
ROBUST_RADII = (0.0, 0.05, 0.1, 0.2, 0.5)


@dataclass(frozen=True)
class NatConfig(ModelTrainingConfig):
    chips: int = 16  # random chips of the datasheet's error distribution trained over


#: Seeds of the random chips NAT trains over; far from training (0..) and unseen (101..) seeds.
NAT_SEED_BASE = 10_000


def model_accuracy(ctx: TrainContext, models, theta: torch.Tensor, split: str = "val") -> float:
    """Mean accuracy of ``theta`` on ``split`` over one or more torch models."""
    f, y = (ctx.f_val, ctx.y_val) if split == "val" else (ctx.f_test, ctx.y_test)
    with torch.no_grad():
        x = ctx.pnn.device_inputs(f).to(theta.dtype)
        accs = [(ctx.pnn(m(theta, x)).argmax(1).numpy() == y).mean() for m in models]
    return float(np.mean(accs))


def train_on_models(
    ctx: TrainContext,
    train_models,
    val_models,
    rho: float = 0.0,
    adaptive: bool = False,
    label: str = "",
) -> MethodResult:
    """Adam (or SAT around Adam) on ``train_models`` (cycled one per step), selecting the
    learning rate and epoch by validation accuracy on ``val_models``."""
    cfg, info = ctx.config, ctx.info
    scale = torch.as_tensor(info.scale, dtype=torch.float32)
    project = Projector(
        info.low / info.scale, info.high / info.scale, info.periodic
    )  # in u = theta / scale
    digital0 = copy.deepcopy(ctx.pnn.state_dict())
    best: dict[str, Any] = {"val": -1.0}
    runs = []
    for lr in cfg.lr_grid:
        ctx.pnn.load_state_dict(digital0)
        torch.manual_seed(ctx.seed)
        u = torch.tensor(ctx.theta0 / info.scale, dtype=torch.float32, requires_grad=True)
        groups = [{"params": [u], "lr": lr}]
        if ctx.pnn.trainable:
            groups.append({"params": list(ctx.pnn.parameters()), "lr": cfg.digital_lr})
        opt = (
            SAT(groups, torch.optim.Adam, rho=rho, adaptive=adaptive)
            if rho > 0
            else torch.optim.Adam(groups)
        )
        batches = ctx.minibatches()
        run_best: tuple[float, Any, Any] = (-1.0, None, None)
        since, curve, step = 0, [], 0
        steps_per_epoch = max(1, len(ctx.y_train) // 128)
        for epoch in range(cfg.epochs):
            for _ in range(steps_per_epoch):
                idx = next(batches)
                model = train_models[step % len(train_models)]
                step += 1
                labels = torch.as_tensor(ctx.y_train[idx])

                # rebuilds the graph: a hybrid input layer is part of it; the defaults bind
                # this step's batch and model, as the closure may run after the loop moves on
                def closure(opt=opt, idx=idx, model=model, labels=labels, u=u):
                    opt.zero_grad()
                    x = ctx.pnn.device_inputs(ctx.f_train[idx]).to(torch.float32)
                    loss = F.cross_entropy(ctx.pnn(model(u * scale, x)), labels)
                    loss.backward()
                    return loss

                closure()  # gradient at theta (SAT's ascent direction, or the plain step)
                opt.step(closure) if rho > 0 else opt.step()
                project(u)
            acc = model_accuracy(ctx, val_models, (u * scale).detach())
            curve.append(acc)
            if acc > run_best[0]:
                run_best, since = (
                    (
                        acc,
                        (u * scale).detach().numpy().astype(float),
                        copy.deepcopy(ctx.pnn.state_dict()),
                    ),
                    0,
                )
            else:
                since += 1
            if ctx.progress is not None:
                ctx.progress.set_postfix_str(f"{label} lr={lr} epoch={epoch} val={acc:.3f}")
            if since >= cfg.patience:
                break
        runs.append({"lr": lr, "best_val": run_best[0], "epochs": len(curve), "val_curve": curve})
        if run_best[0] > best["val"]:
            best = {"val": run_best[0], "theta": run_best[1], "digital": run_best[2], "lr": lr}
    ctx.pnn.load_state_dict(best["digital"])
    chosen = next(r for r in runs if r["lr"] == best["lr"])
    return MethodResult(
        info.project(best["theta"]),
        {
            "chosen_lr": best["lr"],
            "model_val_accuracy": best["val"],
            "val_curve": chosen["val_curve"],
            "lr_search": [{k: r[k] for k in ("lr", "best_val", "epochs")} for r in runs],
        },
    )


def choose_radius(
    ctx: TrainContext, train_models, val_models, radii, adaptive: bool = False, label: str = ""
) -> tuple[MethodResult, float]:
    """SAT at each radius in ``radii`` (each from the same start); keep the largest whose
    validation accuracy ``p`` on ``val_models`` is within ``sqrt(p_best (1 - p_best) / n_val)``
    of the best one's: flatness is worth what the validation set cannot resolve, not more.
    Returns the result (``extra["radius_search"]``) and the radius."""
    start = copy.deepcopy(ctx.pnn.state_dict())  # a hybrid PNN's layers start alike
    tried = []
    for rho in sorted(set(radii)):  # a radius given twice is trained once
        ctx.pnn.load_state_dict(start)
        res = train_on_models(
            ctx, train_models, val_models, rho=rho, adaptive=adaptive, label=f"{label} rho={rho:g}"
        )
        tried.append((rho, res, copy.deepcopy(ctx.pnn.state_dict())))
    best = max(r.extra["model_val_accuracy"] for _, r, _ in tried)
    tolerance = float(np.sqrt(best * (1 - best) / len(ctx.y_val)))
    rho, res, digital = [t for t in tried if t[1].extra["model_val_accuracy"] >= best - tolerance][
        -1
    ]
    ctx.pnn.load_state_dict(digital)
    res.extra["radius_search"] = {
        "rho": rho,
        "val": {f"{r:g}": t.extra["model_val_accuracy"] for r, t, _ in tried},
        "tolerance": tolerance,
    }
    return res, rho


#: The methods that train on one model of the chip: (name, config, which model, with SAT,
#: summary). Data rather than four near-copies of one function.
ONE_MODEL_METHODS = (
    ("oracle", ModelTrainingConfig, "true", False,
     "exact gradients through the true, noise-free chip model"),
    ("oracle-sat", ModelSatConfig, "true", True,
     "SAT with exact gradients through the true chip model: what flatness buys without model error"),
    ("offline", ModelTrainingConfig, "nominal", False,
     "backprop on the nominal (datasheet) model, deployed as-is"),
    ("offline-sat", ModelSatConfig, "nominal", True, "SAT on the nominal model, deployed as-is"),
)  # fmt: skip


def _on_one_model(name: str, which: str, sat: bool):
    def method(ctx: TrainContext) -> MethodResult:
        model = ctx.model(which)
        if sat and ctx.config.objective == "robust":
            return choose_radius(
                ctx, [model], [model], ROBUST_RADII, ctx.config.adaptive, label=name
            )[0]
        kw = {"rho": ctx.config.rho, "adaptive": ctx.config.adaptive} if sat else {}
        return train_on_models(ctx, [model], [model], label=name, **kw)

    method.__name__ = name.replace("-", "_")
    return method


for _name, _config, _which, _sat, _summary in ONE_MODEL_METHODS:
    register(_name, _config, needs=_which, summary=_summary)(_on_one_model(_name, _which, _sat))


@register(
    "nat",
    NatConfig,
    needs="nominal",
    requires=("sibling",),
    summary="noise-aware training over random chips of the datasheet error distribution",
)
def nat(ctx: TrainContext) -> MethodResult:
    ctx.model("nominal")  # the same clear error for a black-box device
    sibling = getattr(ctx.source, "sibling", None)
    if sibling is None:
        raise TypeError(
            "nat needs a simulator that can draw random chips of its error distribution (sibling(seed=...))"
        )
    models = [sibling(seed=NAT_SEED_BASE + i).true_model() for i in range(ctx.config.chips)]
    return train_on_models(ctx, models, models[:4], label="nat")
