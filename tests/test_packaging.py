"""Results others can read (output files follow the umask), SLURM job names, and a built
wheel installed into a fresh venv: configs inside the package, a run and a multirun."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import PROJECT

from editexp.cache import atomic_torch_save, atomic_write_json, atomic_write_text, current_umask


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        written = [
            atomic_write_text(tmp_path / "a.txt", "x"),
            atomic_write_json(tmp_path / "b.json", {"a": 1}),
            atomic_torch_save(tmp_path / "c.pt", {"a": 1}),
        ]
        plain = tmp_path / "plain.txt"
        plain.write_text("x")  # what any other program would create
    finally:
        os.umask(old)
    assert _mode(plain) == 0o666 & ~umask
    for path in written:
        assert _mode(path) == 0o666 & ~umask, path
    assert not list(tmp_path.glob(".*.tmp"))


# --------------------------------------------------------------------------- SLURM job names


@pytest.mark.parametrize(
    ("preset", "job_name"),
    [(["+experiment=layer_search"], "editexp-layer_search"), ([], "editexp-sweep")],
)
def test_slurm_job_name_is_the_experiment(tmp_path: Path, preset, job_name) -> None:
    """The sbatch script submitit writes names the job after the experiment preset (a fake
    sbatch refuses the job, so nothing runs and no cluster is needed)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("sbatch", "srun"):
        (fake / tool).write_text("#!/bin/sh\necho 'refused by the test' >&2\nexit 1\n")
        (fake / tool).chmod(0o755)
    sweep = tmp_path / "sweep"
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(
        [sys.executable, "-m", "editexp", "-m", *preset, "model=tiny-llama3",
         "layer=0,1", "logger=none", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert "refused by the test" in result.stdout + result.stderr
    (script,) = sweep.glob(".submitit/.submission_file_*.sh")
    assert f"#SBATCH --job-name={job_name}\n" in script.read_text()


# --------------------------------------------------------------------------- a built wheel

SMALL = [
    "model=tiny-llama3",
    "n_edits=1",
    "logger=none",
    "stats.n_tokens=3000",
    "stats.seq_len=64",
    "eval.generation_facts=0",
    "eval.held_out_keys=32",
    "editing.prefixes.count=2",
    "editing.prefixes.length=5",
    "model.hparams.memit.v_steps=2",
]


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The package built as a wheel from a copy of the source (the files pyproject names)
    and installed, without dependencies, into a fresh venv that sees this interpreter's
    packages (torch & co. are not installed again; no network)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in ("pyproject.toml", "README.md", "conf", "editexp", "hydra_plugins"):
        if (PROJECT / name).is_dir():
            shutil.copytree(PROJECT / name, source / name, ignore=ignore)
        else:
            shutil.copy(PROJECT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    dist = root / "dist"
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", dist, source]
    subprocess.run(build, check=True, timeout=300)
    (wheel,) = dist.glob("editexp-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv],
                   check=True, timeout=120)  # fmt: skip
    install = [*pip, "--python", venv / "bin" / "python", "install", "--no-deps", "--no-index"]
    install.append("--ignore-installed")  # an editable install of editexp outside the venv
    subprocess.run([*install, wheel], check=True, timeout=300)
    return Installed(wheel, venv)


def test_wheel_holds_the_configs_and_the_launcher_plugin(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    conf = PROJECT / "conf"
    configs = {f"editexp/conf/{path.relative_to(conf).as_posix()}" for path in conf.rglob("*.yaml")}
    assert "editexp/conf/hydra/launcher/local.yaml" in configs
    assert configs <= names, sorted(configs - names)
    plugin = {
        "hydra_plugins/editexp_launcher/__init__.py",
        "hydra_plugins/editexp_launcher/launcher.py",
    }
    assert plugin <= names, sorted(plugin - names)


def test_pyproject_lists_every_package() -> None:
    """pyproject.toml lists the packages (conf/ maps into one of them): a new subpackage must
    be added there, or the wheel would lack it."""
    import tomllib
    from setuptools import find_packages

    pyproject = tomllib.loads((PROJECT / "pyproject.toml").read_text())
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    plugins = find_packages(str(PROJECT / "hydra_plugins"))  # hydra_plugins: a namespace
    found = {*find_packages(str(PROJECT), include=["editexp*"]), "hydra_plugins"}
    found |= {f"hydra_plugins.{name}" for name in plugins}
    assert found | {"editexp.conf"} == listed
    assert not (PROJECT / "editexp" / "conf").exists()  # the configs live in conf/ only


@pytest.mark.slow  # about a minute of CPU: a tiny run, a 2-point multirun, 5 CLI starts
def test_wheel_runs_from_any_directory(installed: Installed, tmp_path: Path) -> None:
    """Outside the repository, with the installed package only: its configs, the job config,
    the launcher plugin, tab completion, a run (results in its log file, files readable by
    others) and a multirun with its report."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    env["PATH"] = f"{installed.venv / 'bin'}{os.pathsep}{env['PATH']}"

    def call(*args: str | Path) -> str:
        result = subprocess.run(
            [str(a) for a in args], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout + result.stderr

    where = call(
        installed.bin("python"),
        "-c",
        "import editexp.config, hydra_plugins.editexp_launcher as p;"
        "print(editexp.config.CONFIG_DIR); print(p.__file__)",
    )
    conf, plugin = (Path(line) for line in where.strip().splitlines()[-2:])
    site = installed.venv / "lib"
    assert site in conf.parents and site in plugin.parents, where  # not the source tree's
    assert (conf / "config.yaml").is_file() and (conf / "model" / "tiny-llama3.yaml").is_file()

    assert "name: tiny-llama3" in call("editexp", "--cfg", "job", "model=tiny-llama3")
    launcher = call("editexp", "--cfg", "hydra", "hydra/launcher=local", "+experiment=layer_search")
    assert "_target_: hydra_plugins.editexp_launcher.launcher.ParallelLocalLauncher" in launcher

    # tab completion as bash runs it: the installed script, then a completion request
    completion = call(
        "bash",
        "-c",
        'eval "$(editexp -sc install=bash)"; COMP_LINE="editexp algorithm=em" COMP_CWORD=1;'
        'hydra_bash_completion; echo "${COMPREPLY[@]}"',
    )
    assert completion.split() == ["algorithm=emmet"], completion

    old = os.umask(0o022)
    try:
        call("editexp", *SMALL, "hydra.run.dir=single")
    finally:
        os.umask(old)
    run_dir = tmp_path / "single"
    log = (run_dir / "runner.log").read_text()
    assert "Results:" in log and "post" in log, log
    for name in ("summary.json", "facts.jsonl", "batches.jsonl", "deltas.pt", "checkpoint.pt"):
        assert _mode(run_dir / name) == 0o644, name

    call("editexp", "-m", *SMALL, "layer=0,1", "hydra.sweep.dir=sweep")
    assert len(list((tmp_path / "sweep").glob("*/summary.json"))) == 2
    assert "2 of 2 grid points complete" in call("editexp-report", tmp_path / "sweep")
