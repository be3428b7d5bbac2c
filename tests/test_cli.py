"""The command line: fast help, version, the lists it shows, and one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from blackbox_sat import cli
from blackbox_sat.data.tasks import TASK_NAMES
from blackbox_sat.methods import method_names


def test_help_lists_exactly_the_registered_methods_and_tasks():
    assert sorted(cli.METHODS) == sorted(method_names())
    assert tuple(cli.TASKS) == tuple(TASK_NAMES)


def test_help_and_version_do_not_import_torch():
    code = (
        "import sys, blackbox_sat.cli as c\n"
        "try:\n    c.build_parser().parse_args(['--version'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize(
    "setting,expect",
    [
        ("rho=0.O5", "rho='0.O5': expected float"),
        ("rhoo=0.1", "did you mean 'rho'"),
        ("refine.rule=newton", "expected one of 'spsa', 'rdsa', 'sa-spsa'"),
        ("surrogate.hyper.max_step=10", "did you mean 'surrogate.hyper.max_steps'"),
    ],
)
def test_bad_set_is_one_line_exit_2_and_no_run_folder(tmp_path, capsys, setting, expect):
    out = tmp_path / "run"
    code = cli.main(
        [
            "train",
            "--device",
            "mrr",
            "--method",
            "blackbox-sat",
            "--budget",
            "50",
            "--out",
            str(out),
            "--set",
            setting,
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and expect in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(*a, **k):
        raise ZeroDivisionError("a real bug")

    monkeypatch.setattr("blackbox_sat.harness.run.train", broken)
    with pytest.raises(ZeroDivisionError):
        cli.main(["train", "--device", "mrr", "--out", "never", "--quiet"])
