"""A wheel built with ``python -m build`` and installed in a fresh venv runs the demo.

The wheel is built from a copy of the source (the build's ``build/`` and
``*.egg-info`` folders stay out of the working tree), installed with ``--no-deps`` in a
new venv, and the running interpreter's installed dependencies are made visible to that
venv by a ``.pth`` line (nothing is downloaded or reinstalled). Lines of a ``.pth`` file
only extend ``sys.path``: the ``.pth`` files of the dependencies' folder, among them the
editable install's finder of this checkout, are not run, so ``radfed`` is the wheel's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Data files the package reads at run time (importlib.resources or beside a module).
RUNTIME_DATA = {
    "client/params": "radfed/client/params",
    "experiments/studies": "radfed/experiments/studies",
    "deploy/flower_app": "radfed/deploy/flower_app",
}

# About 5 CPU-minutes, most of it synthesising and extracting the demo's 180 cases: a few
# minutes on an idle 2-core machine, 17 minutes measured at a load of 10 on 2 cores.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def _copy_sources(dest: Path) -> None:
    """pyproject.toml, the top-level files and every folder of ``package-dir``."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = {Path(d).parts[0] for d in config["tool"]["setuptools"]["package-dir"].values()}
    dest.mkdir()
    for entry in ROOT.iterdir():
        if entry.is_file():
            shutil.copy2(entry, dest / entry.name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for folder in sorted(folders):
        shutil.copytree(ROOT / folder, dest / folder, ignore=ignore)


def _run(args: list, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("wheel")
    _copy_sources(tmp / "src")
    done = _run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", tmp / "dist",
         tmp / "src"]
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("radfed-*.whl")
    return {"tmp": tmp, "wheel": wheel, "log": done.stdout + done.stderr}


def test_wheel_holds_the_runtime_data(built):
    names = set(zipfile.ZipFile(built["wheel"]).namelist())
    for source, target in RUNTIME_DATA.items():
        files = [p for p in (ROOT / source).iterdir() if p.is_file()]
        assert files, source
        for path in files:
            assert f"{target}/{path.name}" in names, f"{source}/{path.name} is not in the wheel"
    # The SuperNode, SuperLink and ServerApp components the Flower App names.
    flower_app = tomllib.loads((ROOT / "deploy/flower_app/pyproject.toml").read_text())
    for ref in flower_app["tool"]["flwr"]["app"]["components"].values():
        module = ref.split(":")[0].replace(".", "/")
        assert f"{module}.py" in names, ref


def test_wheel_builds_without_setuptools_warnings(built):
    # setuptools warns "Package 'radfed.client.params' is absent from the `packages`
    # configuration" for data folders while include-package-data is on.
    assert "absent from the `packages` configuration" not in built["log"], (
        "set include-package-data = false in [tool.setuptools]: the data files are "
        "listed in [tool.setuptools.package-data]"
    )


def test_wheel_in_a_fresh_venv_runs_the_demo(built):
    tmp = built["tmp"]
    venv = tmp / "venv"
    done = _run([sys.executable, "-m", "venv", "--without-pip", venv])
    assert done.returncode == 0, done.stderr
    python = venv / "bin" / "python"
    # This interpreter's pip installs into the new venv (--python); no index is used.
    done = _run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
         "--no-index", built["wheel"]]
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    site_packages = _run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
    ).stdout.strip()
    # The dependencies already installed for this interpreter, after the venv's own.
    ours = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))
    (Path(site_packages) / "zz_radfed_test_dependencies.pth").write_text(
        "".join(f"{p}\n" for p in ours)
    )

    cwd = tmp / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "RADFED_"))}
    env |= {
        "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        "VIRTUAL_ENV": str(venv),
        "HOME": str(tmp / "home"),  # a cold feature cache, no user settings
        "MPLBACKEND": "Agg",
    }
    where = _run(
        [python, "-c",
         "import importlib.resources as r, radfed, radfed.client, radfed.deploy; "
         "print(radfed.__file__); print(r.files('radfed.client') / 'params' / 'fast.yaml'); "
         "print(radfed.deploy.__file__)"],
        cwd=cwd, env=env,
    ).stdout.split()  # fmt: skip
    assert len(where) == 3, where
    for path in where:
        assert Path(path).resolve().is_relative_to(venv.resolve()), path
    assert Path(where[1]).is_file()

    # The example study file is package data; the UCI tables are the project's shared data.
    shared = ROOT.parent / "shared" / "data"
    if (shared / "heart_disease").is_dir():
        hd = _run(
            [venv / "bin" / "radfed", "-q", "heart-disease", "--out", tmp / "hd"],
            cwd=cwd, env=env | {"RADFED_SHARED_DATA": str(shared)},
        )  # fmt: skip
        assert hd.returncode == 0, hd.stdout + hd.stderr
        assert (tmp / "hd" / "study.toml").is_file()
        assert "Warning" not in hd.stderr, hd.stderr

    out = tmp / "demo"
    demo = _run(
        [venv / "bin" / "radfed", "-q", "demo", "--params", "fast", "--sites", 3,
         "--patients", 60, "--out", out],
        cwd=cwd, env=env, timeout=1200,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert list(out.rglob("report.html")), sorted(p.name for p in out.rglob("*"))
    results = sorted(out.rglob("results.json"))
    assert results, sorted(p.name for p in out.rglob("*"))
    assert "Warning" not in demo.stderr, demo.stderr[-3000:]
    # The demo's readers (15 patients per site) run the reproducibility (ICC) filter.
    icc = json.loads(results[0].read_text())["reproducibility"]
    assert set(icc["comparisons"]) == {"inter_reader", "intra_reader"}
    assert all(c["n"] >= 20 for c in icc["comparisons"].values())
    assert icc["kept"] and icc["dropped"], "the ICC filter should keep some features, drop some"
    # An honest demo (leave-one-site-out included) publishes no per-site count below
    # its sites' minimum cell size (3); the walker is tested in test_privacy_attacks.
    from radfed.tests.test_privacy_attacks import _small_counts

    published = json.loads(results[0].read_text())
    assert published["external"]["held_out"]
    assert _small_counts(published, 3) == []
