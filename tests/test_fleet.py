"""``compare --recalibrate K [--finetune F]`` (harness/fleet.py): each trial's setting on every
unseen chip as-is, after a K-setting recalibration, and against the chip's own oracle."""

from __future__ import annotations

import csv

import numpy as np
import pytest

import blackbox_sat as bs
from blackbox_sat.cli import main
from blackbox_sat.devices.contract import InvalidInput

#: A 4-mode mesh with large static offsets: a new chip's errors are far from chip 0's, so a
#: setting deployed as-is loses accuracy that a recalibration can recover.
OFFSETS = {"n_modes": 4, "sigma_phase": 0.5}
FAST = {"lr_grid": [0.1], "epochs": 30, "patience": 10}
TINY = dict(task="iris", seeds=1, budget=40, sweep={}, progress=False, config=FAST)


def test_twin_recalibration_per_chip_within_k_settings(tmp_path):
    k, chips = 10, (101, 102)
    res = bs.compare(
        "mzi",
        methods=["twin"],
        device_kw=OFFSETS,
        unseen=chips,
        out=tmp_path,
        recalibrate=k,
        **TINY,
    )
    rows = res["fleet"]
    assert [r["chip"] for r in rows] == list(chips) and all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert r["recal_method"] == "twin" and 1 <= r["settings_recal"] <= k
        assert r["acc_as_is"] == res["rows"][0][f"unseen_{r['chip']}"]  # the same measurement
        assert 0 < r["acc_oracle"] <= 1
    assert np.mean([r["acc_recal"] for r in rows]) > np.mean([r["acc_as_is"] for r in rows])
    with (tmp_path / "fleet.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [int(r["chip"]) for r in table] == list(chips)
    summary = (tmp_path / "summary.md").read_text()
    assert f"## Per unseen chip: as-is / after {k}-setting recalibration / chip oracle" in summary
    # A re-run reuses the per-chip rows (no training run is redone).
    done = {p: p.stat().st_mtime_ns for p in (tmp_path / "fleet").rglob("result.json")}
    assert len(done) == 2 * len(chips)  # a recalibration and an oracle per chip
    with pytest.warns(UserWarning, match="reusing 1 finished trial"):
        again = bs.compare(
            "mzi",
            methods=["twin"],
            device_kw=OFFSETS,
            unseen=chips,
            out=tmp_path,
            recalibrate=k,
            **TINY,
        )
    assert again["fleet"] == rows
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "fleet").rglob("result.json")} == done
    # Another K is another configuration: refused before anything runs.
    with pytest.raises(InvalidInput, match="twin-seed0-chip101 differs in stages.recal"):
        bs.compare(
            "mzi",
            methods=["twin"],
            device_kw=OFFSETS,
            unseen=chips,
            out=tmp_path,
            recalibrate=k + 1,
            **TINY,
        )


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"recalibrate": 0}, "recalibrate must be an int >= 1"),
        ({"recalibrate": -3}, "recalibrate must be an int >= 1"),
        ({"recalibrate": True}, "recalibrate must be an int >= 1"),
        ({"recalibrate": 5, "finetune": 0}, "finetune must be an int >= 1"),
        ({"finetune": 5}, "needs --recalibrate"),
        ({"recalibrate": 5, "unseen": ()}, "needs unseen chips"),
    ],
)
def test_bad_recalibration_is_refused_before_anything_runs(tmp_path, kw, match):
    kw = {"unseen": (101,), **kw}
    with pytest.raises(InvalidInput, match=match):
        bs.compare("mzi", methods=["offline"], device_kw=OFFSETS, out=tmp_path / "o", **TINY, **kw)
    assert not (tmp_path / "o").exists()


def _cli(out, *extra):
    return main(
        [
            *("compare", "--device", "mzi", "--device-kw", "n_modes=4", "--task", "iris"),
            *("--methods", "offline", "--seeds", "1", "--budget", "10", "--out", str(out)),
            *("--unseen", "seed=101", "--sweep", "drift=0.5", "--quiet"),
            *("--set", "epochs=3", "--set", "lr_grid=[0.1]", *extra),
        ]
    )


def test_cli_recalibrate_and_finetune_a_device_free_method_with_spsa(tmp_path, capsys):
    assert _cli(tmp_path / "bad", "--recalibrate", "-1") == 2
    assert "recalibrate must be an int >= 1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert _cli(tmp_path / "o", "--recalibrate", "4", "--finetune", "6") == 0
    assert "Per unseen chip" in capsys.readouterr().out
    with (tmp_path / "o" / "fleet.csv").open() as fh:
        (row,) = list(csv.DictReader(fh))
    assert (row["method"], row["chip"], row["status"]) == ("offline", "101", "ok")
    assert row["recal_method"] == row["finetune_method"] == "spsa"
    assert int(row["settings_recal"]) <= 4 and int(row["settings_finetune"]) <= 10
