"""``collect`` and ``fit-surrogate`` through the CLI: designed queries into a ledger, and a
surrogate fit from it that predicts held-out settings and the loss gradient."""

import json

import numpy as np
import torch

from blackbox_sat.cli import main
from blackbox_sat.devices.contract import describe
from blackbox_sat.devices.ledger import Ledger
from blackbox_sat.sim.mrr import mrr
from surrogates import load_surrogate

KW = ["--device-kw", "in_dim=4", "--device-kw", "out_dim=3"]


def test_collect_then_fit_surrogate_reports_held_out_quality(tmp_path, capsys):
    info = describe(mrr(in_dim=4, out_dim=3))
    np.save(tmp_path / "c.npy", info.start(0))
    out = tmp_path / "col"
    assert (
        main(
            [
                "collect",
                "--device",
                "mrr",
                *KW,
                "--settings",
                "60",
                "--around",
                str(tmp_path / "c.npy"),
                "--radius",
                "0.05",
                "--inputs",
                "16",
                "--task",
                "iris",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    with Ledger(out / "ledger.sqlite") as led:
        assert led.counts()["settings"] == 60
        theta, x, y, _groups = led.samples()
    assert {r.purpose for r in Ledger(out / "ledger.sqlite").rows()} == {"probe"}
    assert (
        np.abs((theta - info.start(0)) / info.scale).max() <= 0.05 + 1e-9
    )  # inside the trust region
    np.testing.assert_allclose(np.load(out / "centre.npy"), info.start(0))
    capsys.readouterr()

    assert (
        main(
            [
                "fit-surrogate",
                "--ledger",
                str(out / "ledger.sqlite"),
                "--kind",
                "hyper",
                "--out",
                str(tmp_path / "s.pt"),
            ]
        )
        == 0
    )
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["settings"] == 60 and rep["heldout_settings"] == 12
    assert rep["heldout_r2"] > 0.85 and rep["heldout_r2_delta"] > 0.8  # theta's part, not just x's
    assert rep["grad_cosine"] > 0.9 and -1 <= rep["true_grad_turn"] <= 1
    assert json.loads((tmp_path / "s.pt.json").read_text())["grad_cosine"] == rep["grad_cosine"]
    sur = load_surrogate(tmp_path / "s.pt")
    with torch.no_grad():
        pred = sur.predict(
            torch.as_tensor(theta[:16], dtype=torch.float32),
            torch.as_tensor(x[:16], dtype=torch.float32),
        ).numpy()
    assert np.abs(pred - y[:16]).mean() < 0.2 * np.abs(y).mean()
