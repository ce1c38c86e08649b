"""User errors that used to be tracebacks or silent: each is one line on stderr and exit status
2 before any work (a missing model, a garbage GGUF file, a mistyped Hugging Face id, a bad
launcher setting, a preset value that leaves nothing to sweep, a ``logger.mode`` typo, an
appended key the config does not know, an empty target), Ctrl-C says where the run stopped,
and a run refused before it starts leaves no new run directory behind."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from console_scripts import COUNTERFACT, TINY, TWO_UPDATES
from omegaconf import OmegaConf

import editexp.runner as runner_module
import editexp.task as task_module
from editexp import cli, report
from editexp.config import ConfigError, check_appended, compose
from editexp.editing.editor import EditRequest, as_request
from editexp.errors import UserError
from editexp.resolvers import ResolverError, divisors_upto, sizes_upto

PROJECT = Path(__file__).resolve().parents[1]
HF_MODEL = ["model=smollm2-135m", "logger=none", "model.source=hf"]  # model.path: a HF id or dir


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def error(self, prog: str = "editexp") -> str:
        """The one line on stderr of a user error (exit 2), without its prefix."""
        assert self.code == 2, f"exit {self.code}:\n{self.err[-3000:]}"
        lines = [line for line in self.err.splitlines() if line.strip()]
        assert len(lines) == 1, f"expected one line on stderr, got:\n{self.err}"
        assert lines[0].startswith(f"{prog}: error: "), lines[0]
        return lines[0].removeprefix(f"{prog}: error: ")


def editexp(*args: str) -> Result:
    """``editexp args`` in this process, through Hydra, with its exit status."""
    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["editexp", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
        for handler in list(logging.getLogger().handlers):  # Hydra's, per run
            handler.close()
            logging.getLogger().removeHandler(handler)
    return Result(code, out.getvalue(), err.getvalue())


def subprocess_editexp(*args: str, env: dict[str, str], cwd: Path) -> Result:
    process = subprocess.run(
        [sys.executable, "-m", "editexp.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(PROJECT), **env},
        cwd=cwd,
    )
    return Result(process.returncode, process.stdout, process.stderr)


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a run loads its model (user errors come before it)."""

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(runner_module, "load_model", must_not_load)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("EDITEXP_CACHE_DIR", str(path))
    return path


# --------------------------------------------------------------------------- models


def test_a_model_path_that_does_not_exist(tmp_path, no_model):
    run_dir = tmp_path / "run"
    result = editexp(*HF_MODEL, "model.path=/no/such/model", f"hydra.run.dir={run_dir}")
    assert result.error().startswith("model path /no/such/model does not exist")
    assert not run_dir.exists()


def test_a_garbage_gguf_file(tmp_path, no_model, cache):
    garbage = tmp_path / "model.gguf"
    garbage.write_bytes(b"this is not a GGUF file\n" * 64)
    run_dir = tmp_path / "run"
    result = editexp(
        "model=smollm2-135m", "logger=none", f"model.path={garbage}", f"hydra.run.dir={run_dir}"
    )
    line = result.error()
    assert line.startswith(f"GGUF file {garbage} cannot be read (") and "expected a GGUF" in line
    assert not run_dir.exists()


def test_a_mistyped_hugging_face_id_offline(tmp_path):
    """HF_HUB_OFFLINE is read when huggingface_hub is imported: a process of its own."""
    result = subprocess_editexp(
        *HF_MODEL,
        "model.path=HuggingFaceTB/SmolLM2-135X",
        "hydra.run.dir=run",
        env={"HF_HUB_OFFLINE": "1", "EDITEXP_CACHE_DIR": str(tmp_path / "cache")},
        cwd=tmp_path,
    )
    line = result.error()
    assert line.startswith("model 'HuggingFaceTB/SmolLM2-135X' cannot be loaded (HF_HUB_OFFLINE")
    assert not (tmp_path / "run").exists()


def test_editor_from_pretrained_of_a_missing_path_is_one_user_error():
    from editexp import Editor

    with pytest.raises(UserError) as caught:
        Editor.from_pretrained("/no/such")
    message = str(caught.value)
    assert message.startswith("model '/no/such' is not a model in conf/model (")
    assert "\n" not in message and caught.value.__cause__ is None


# --------------------------------------------------------------------------- config values


def test_parallel_jobs_zero_is_refused_before_any_job(tmp_path, no_model):
    sweep = tmp_path / "sweep"
    result = editexp(
        "-m",
        *TINY,
        "layer=0,1",
        "hydra/launcher=local",
        "hydra.launcher.parallel_jobs=0",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.error() == (
        "hydra.launcher.parallel_jobs=0; expected a positive integer or null (automatic)"
    )
    assert not (sweep / "0").exists()


def test_a_preset_limit_that_leaves_nothing_to_sweep(tmp_path, no_model):
    result = editexp(
        "-m", "+experiment=batch_scaling", "max_edits=0", f"hydra.sweep.dir={tmp_path / 's'}"
    )
    assert result.error() == (
        "max_edits=0 leaves no batch size to sweep (the sizes are 16,64,256,1024,4096); "
        "use max_edits >= 16"
    )


def test_the_resolvers_name_what_they_cannot_use():
    with pytest.raises(ResolverError, match=r"max_edits='abc'; expected a positive integer"):
        sizes_upto("abc")
    with pytest.raises(ResolverError, match="n_edits=7 is divisible by no batch size"):
        divisors_upto(7, 16, 64)
    assert sizes_upto(256, 16, 64, 256, 1024) == "16,64,256"


def test_a_logger_mode_typo(tmp_path, no_model):
    run_dir = tmp_path / "run"
    result = editexp(*TINY, "logger=wandb", "logger.mode=ofline", f"hydra.run.dir={run_dir}")
    assert result.error() == "logger.mode='ofline'; expected one of offline, online, disabled"
    assert not run_dir.exists()


# --------------------------------------------------------------------------- typos accepted


def test_an_appended_key_the_config_does_not_know(tmp_path, no_model):
    run_dir = tmp_path / "run"
    line = editexp(*TINY, "+lamda=10", f"hydra.run.dir={run_dir}").error()
    assert line.startswith("+lamda=10: the config has no key 'lamda' (did you mean lambda?)")
    nested = editexp(*TINY, "+eval.schedul=final", f"hydra.run.dir={run_dir}").error()
    assert "the config has no key 'eval.schedul' (did you mean eval.schedule?)" in nested
    assert not run_dir.exists()


def test_an_appended_key_is_refused_for_the_whole_sweep(tmp_path, no_model):
    sweep = tmp_path / "sweep"
    line = editexp("-m", *TINY, "+lamda=10", "layer=0,1", f"hydra.sweep.dir={sweep}").error()
    assert line.startswith("2 of 2 grid points would fail, so no job was started: #0")
    assert "the config has no key 'lamda'" in line


def test_what_may_be_appended():
    cfg = compose("tiny-llama3")
    choices = {"experiment": "layer_search", "model": "tiny-llama3"}
    allowed = ["+experiment=layer_search", "+debug.stop_after_updates=1", "+eval.metrics=[x]"]
    check_appended([*allowed, "+eval.perplexity.n_tokens=64", "lambda=1"], cfg, choices)
    with pytest.raises(ConfigError, match="no key 'seeed' \\(did you mean seed\\?\\)"):
        check_appended(["+seeed=1"], cfg, choices)


def test_an_empty_target_in_an_edit_request_is_refused():
    with pytest.raises(UserError, match="target_new=''; expected a non-empty string"):
        as_request({"prompt": "{} is in", "subject": "Paris", "target_new": ""})
    with pytest.raises(UserError, match="target_new='  '; expected a non-empty string"):
        as_request(EditRequest(3, "{} is in", "Paris", "  "))


def test_an_empty_target_in_the_facts_is_refused(tmp_path, no_model):
    facts = json.loads(COUNTERFACT.read_text())[:4]
    facts[1]["requested_rewrite"]["target_new"]["str"] = ""
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(facts))
    line = editexp(*TINY, f"data.counterfact={path}", f"hydra.run.dir={tmp_path / 'run'}").error()
    assert "target_new.str" in line and "must be a non-empty string, got ''" in line
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- refused runs


def test_a_refused_run_leaves_no_new_directory(tmp_path, monkeypatch, no_model):
    """Neither the run directory nor the folders Hydra made above it (outputs/...)."""
    monkeypatch.chdir(tmp_path)
    result = editexp(*TINY, "seed=abc")
    assert result.error() == "seed='abc'; expected an integer"
    assert list(tmp_path.iterdir()) == []


def test_a_refused_run_never_removes_an_existing_directory(tmp_path, no_model):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("earlier results")
    assert editexp(*TINY, "seed=abc", f"hydra.run.dir={run_dir}").code == 2
    assert (run_dir / "notes.txt").read_text() == "earlier results"


# --------------------------------------------------------------------------- Ctrl-C, report


def test_ctrl_c_says_where_the_run_stopped_and_the_rerun_resumes(tmp_path, cache, monkeypatch):
    run_dir = tmp_path / "run"
    edit_all = runner_module.edit_all

    def interrupted_after_one_update(steps, recorder, stop_after=None, progress=None):
        try:
            edit_all(steps, recorder, 1, progress)
        except runner_module.SimulatedCrash:
            raise KeyboardInterrupt from None

    with monkeypatch.context() as patch:
        patch.setattr(runner_module, "edit_all", interrupted_after_one_update)
        result = editexp(*TINY, *TWO_UPDATES, f"hydra.run.dir={run_dir}")
    assert result.code == 130, result.err[-3000:]
    assert "Traceback" not in result.err
    assert result.err.strip().splitlines()[-1] == (
        f"editexp: interrupted: the run stopped after update 1 of 2 (saved in {run_dir}); "
        "rerunning the same command resumes from there"
    )
    resumed = editexp(*TINY, *TWO_UPDATES, f"hydra.run.dir={run_dir}")
    assert resumed.code == 0, resumed.err[-3000:]
    assert "Resuming after update 1 of 2" in resumed.out + resumed.err


def test_ctrl_c_in_a_launcher_is_one_line(monkeypatch):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_hydra_main", interrupted)
    result = editexp("-m", "layer=0,1")
    assert result.code == 130
    assert result.err.startswith("editexp: interrupted; rerunning the same command resumes")
    assert len(result.err.strip().splitlines()) == 1


def test_the_interrupted_message_without_a_checkpoint(tmp_path):
    cfg = OmegaConf.create({})
    message = task_module.interrupted(tmp_path, cfg)
    assert message == (
        "interrupted: the run stopped before its first update was saved; rerunning the same "
        "command starts it again"
    )


@pytest.mark.parametrize("layout", ["empty", "no runs"])
def test_report_on_a_directory_without_runs(tmp_path, capsys, layout):
    if layout == "no runs":
        (tmp_path / "notes").mkdir()
        (tmp_path / "notes" / "readme.txt").write_text("not a sweep")
    with pytest.raises(SystemExit) as exit_:
        report.main([str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"editexp-report: error: no finished run (summary.json) under {tmp_path}")
    assert len(err.strip().splitlines()) == 1
