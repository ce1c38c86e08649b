"""What a Hydra user expects of the console scripts: help texts about the tool, editexp's
version, and ``--help``, ``--version``, ``--cfg job`` and tab completion without torch (the
entry point, ``editexp.cli``, imports the runner only when a run starts)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import editexp

PROJECT = Path(__file__).resolve().parents[1]

# Runs the editexp console script's main as `editexp <args>` in a fresh interpreter, then says
# on stderr whether torch was imported.
PROBE = """
import sys
from editexp.cli import main
sys.argv = ["editexp", *sys.argv[1:]]
try:
    main()
except SystemExit as exit_:
    code = exit_.code
else:
    code = 0
print(f"torch imported: {'torch' in sys.modules}; exit {code}", file=sys.stderr)
"""


def editexp_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(PROJECT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
        cwd=PROJECT,
    )


@pytest.mark.parametrize(
    "args",
    [
        ("--help",),
        ("--version",),
        ("--cfg", "job", "model=tiny-llama3"),
        ("-sc", "install=bash"),
    ],
)
def test_help_version_config_and_completion_do_not_import_torch(args):
    result = editexp_cli(*args)
    assert result.stderr.strip().splitlines()[-1] == "torch imported: False; exit 0", result.stderr


def test_tab_completion_queries_do_not_import_torch():
    result = editexp_cli("-sc", "query=bash", env={"COMP_LINE": "editexp algorithm="})
    assert "algorithm=memit" in result.stdout and "algorithm=alphaedit" in result.stdout
    assert result.stderr.strip().splitlines()[-1] == "torch imported: False; exit 0"


def test_help_is_about_editexp():
    text = editexp_cli("--help").stdout
    assert text.startswith("editexp: one locate-and-edit run")
    assert "powered by Hydra" not in text
    for part in ("algorithm: alphaedit, emmet, memit, rome", "experiment: batch_scaling", "model:"):
        assert part in text  # the config groups
    for key in ("mode=batch|singular|sequential", "n_edits=", "layer=", "lambda=", "data.dir="):
        assert key in text  # the main keys
    assert "editexp -m +experiment=layer_search" in text  # an example command
    assert "$EDITEXP_DATA_DIR" in text  # Hydra's template substitution left it alone


def test_the_quick_help_is_hydras_help():
    """``editexp --help`` prints the help without composing; Hydra's own prints the same."""
    hydras = subprocess.run(
        [sys.executable, "-c", "from editexp.cli import _hydra_main; _hydra_main()", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(PROJECT)},
        cwd=PROJECT,
    )
    assert hydras.returncode == 0, hydras.stderr
    assert editexp_cli("--help").stdout == hydras.stdout


def test_version_is_editexps():
    result = editexp_cli("--version")
    assert result.stdout.startswith(f"editexp {editexp.__version__} (Hydra ")


def test_stats_help_names_its_tool():
    result = subprocess.run(
        [sys.executable, "-m", "editexp.stats_cli", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(PROJECT)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("editexp-stats: compute (or read) and cache")
    assert "stats_cli" not in result.stdout and "powered by Hydra" not in result.stdout
    assert "editexp-stats model=smollm2-135m layer=[0,1,2]" in result.stdout


def test_stats_version_is_editexps(capsys, monkeypatch):
    from editexp import stats_cli

    monkeypatch.setattr(sys, "argv", ["editexp-stats", "--version"])
    stats_cli.main()
    assert capsys.readouterr().out.startswith(f"editexp-stats {editexp.__version__} (Hydra ")


def test_report_help_names_its_tool(capsys):
    from editexp import report

    with pytest.raises(SystemExit) as exit_:
        report.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: editexp-report")
    assert "editexp-report: the tables and figures of an editexp sweep" in text


def test_the_editexp_script_is_the_thin_entry():
    assert 'editexp = "editexp.cli:main"' in (PROJECT / "pyproject.toml").read_text()
