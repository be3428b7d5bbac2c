"""Gradient cosine of one guided-ES pair and of one SPSA pair against the true gradient.

At ``theta0`` of a built-in simulator (its true model gives the gradient): a surrogate
fitted on a 400-setting design around ``theta0``, then ``--pairs`` estimates on fresh
minibatches, each a guided pair (the guide: the surrogate's physics-aware gradients of the
last 4 pairs) and a Rademacher pair, c = 0.02 normalized (docs/experiments.md, "The guided
search").

    .venv/bin/python scripts/guided_cosine.py --device mrr --surrogate hyper
"""

import argparse

import numpy as np
import torch

from blackbox_sat.data.tasks import load_task
from blackbox_sat.devices.contract import describe
from blackbox_sat.devices.metered import MeteredDevice
from blackbox_sat.methods.registry import get_method
from blackbox_sat.sim import BUILTINS
from blackbox_sat.training.config import build
from blackbox_sat.training.context import TrainContext
from blackbox_sat.training.guided import Guide, guide_gradient
from blackbox_sat.training.objectives import DeviceObjective
from blackbox_sat.training.pipeline import Timer, initial_fit
from blackbox_sat.training.pnn import CALIBRATION_INPUTS, PNN, calibrate_gain, readout_loss


def context(device: str, surrogate: str, seed: int = 0) -> TrainContext:
    """What ``train`` hands a method, with a budget that never runs out."""
    source = BUILTINS[device]()
    info, data = describe(source), load_task("digits")
    pnn = PNN.build(data.x_train, data.n_classes, info)
    metered, theta0 = MeteredDevice(source, None, budget=100_000), info.start(seed)
    f_train = pnn.features(data.x_train)
    x_cal = pnn.device_inputs(f_train[:CALIBRATION_INPUTS]).numpy()
    pnn.gain.fill_(calibrate_gain(metered.query(theta0, x_cal, "calibrate"), data.n_classes))
    cfg = build(get_method("blackbox-sat").config, {"surrogate": surrogate, "init_fraction": 0.004})
    return TrainContext(
        metered, source, pnn, f_train, data.y_train, pnn.features(data.x_val), data.y_val,
        pnn.features(data.x_test), data.y_test, theta0, seed, cfg, 100_000,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="mrr")
    ap.add_argument("--surrogate", default="hyper")
    ap.add_argument("--pairs", type=int, default=60)
    args = ap.parse_args()
    ctx = context(args.device, args.surrogate)
    _, sur, choice, theta = initial_fit(ctx, ctx.config, Timer())
    obj, true = DeviceObjective(ctx, "train"), ctx.source.true_model()
    rng, guide, batches, c = np.random.default_rng(0), Guide(obj.n, 4, 0.5), ctx.minibatches(), 0.02
    cos = {"spsa": [], "guided": [], "guide": []}

    def cosine(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    for _ in range(args.pairs):
        idx, u = next(batches), obj.to_u(theta)
        th = torch.tensor(theta, requires_grad=True)
        loss = readout_loss(
            ctx.pnn, true(th, ctx.pnn.device_inputs(ctx.f_train[idx])), ctx.y_train[idx]
        )
        g_true = torch.autograd.grad(loss, th)[0].numpy() * obj.scale
        for kind in ("spsa", "guided"):
            d = rng.choice([-1.0, 1.0], obj.n) if kind == "spsa" else guide.direction(rng)
            (lp, yp), (lm, ym) = (
                obj.loss_outputs(obj.to_theta(u + s * c * d), idx) for s in (1, -1)
            )
            cos[kind].append(cosine((lp - lm) / (2 * c) * d, g_true))
        g = guide_gradient(ctx, sur, theta, obj.inputs(idx), (yp + ym) / 2, idx) * obj.scale
        cos["guide"].append(cosine(g, g_true))
        guide.add(g)
    warm = {k: np.asarray(v[4:]) for k, v in cos.items()}  # once the guide holds 4 gradients
    print(
        args.device,
        choice["chosen"],
        {k: f"{v.mean():.3f} +- {v.std() / np.sqrt(len(v)):.3f}" for k, v in warm.items()},
    )


if __name__ == "__main__":
    main()
