"""The layout says each concept once: one import name, no file name twice, no module too long to read."""

import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict

from tests.helpers import ROOT

MAX_LINES = 400


def project_files(pattern: str = "*") -> list[str]:
    """The files the repository tracks, relative to it."""
    tracked = subprocess.run(["git", "ls-files", pattern], cwd=ROOT, capture_output=True, text=True, check=True)
    return tracked.stdout.split()


def project_modules() -> list:
    """Every Python file the repository tracks (the package, train.py, examples, benches, tests)."""
    return [ROOT / name for name in project_files("*.py")]


def test_no_two_modules_share_a_file_name():
    by_name = defaultdict(list)
    for path in project_modules():
        if path.name != "__init__.py":
            by_name[path.name].append(path.relative_to(ROOT).as_posix())
    assert {name: paths for name, paths in by_name.items() if len(paths) > 1} == {}


def test_no_module_is_over_400_lines():
    lines = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in project_modules()}
    long = {name: n for name, n in lines.items() if n > MAX_LINES}
    assert long == {}


def test_the_package_installs_one_import_name(tmp_path):
    """pyproject maps f's folders into `prequel`: from any other directory, nothing else of ours imports."""
    names = [
        "prequel",
        "prequel.models",
        "prequel.training",
        "prequel.callbacks",
        "models",
        "training",
        "callbacks",
        "tools",
        "train",
    ]
    code = f"import importlib.util, json; print(json.dumps([importlib.util.find_spec(n) is not None for n in {names}]))"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert dict(zip(names, json.loads(r.stdout))) == {n: n.startswith("prequel") for n in names}


def test_a_non_editable_install_trains_and_verifies_from_another_directory(tmp_path):
    """`pip install .` (not editable) into a fresh target, run from elsewhere: the packaged tiny.yaml
    and corpus are found, the stream verifies, and |f| and the code hash are the checkout's."""
    target, work, source = tmp_path / "site", tmp_path / "elsewhere", tmp_path / "source"
    work.mkdir()
    for path in project_files():  # a copy: pip builds in its source tree (build/), not in this checkout
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, source / path)
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pip.returncode == 0, pip.stderr[-2000:]
    installed = sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info"))
    assert installed == ["bin", "prequel"] and [p.name for p in (target / "bin").iterdir()] == ["prequel"]
    env = {**os.environ, "PYTHONPATH": str(target)}  # before the checkout's editable finder
    probe = (
        "import json, prequel, prequel.program as p;"
        "from prequel.checks.settings import load_config, counted_yaml; c = load_config('configs/small.yaml');"
        "print(json.dumps([prequel.__file__, p.code_hash(), p.f_parts(c, counted_yaml(c), b'')]))"
    )

    def facts(cwd, environ):
        r = subprocess.run([sys.executable, "-c", probe], cwd=cwd, env=environ, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout)

    installed, checkout = facts(work, env), facts(ROOT, {k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert installed[0].startswith(str(target)) and checkout[0].startswith(str(ROOT))
    assert installed[1:] == checkout[1:]  # the same code hash and |f|, part by part
    text = work / "notes.txt"
    text.write_bytes((ROOT / "data" / "tinyshakespeare.txt").read_bytes()[:2000])
    for args in (
        [
            "--config",
            "configs/tiny.yaml",
            "--data.path",
            "notes.txt",
            "--run_dir",
            "run",
            "--logging.progress_bar",
            "false",
            "--logging.plot",
            "false",
        ],
        ["verify", "run"],
    ):
        r = subprocess.run(
            [sys.executable, "-m", "prequel", *args], cwd=work, env=env, capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.rstrip().endswith("OK")
    no_models = subprocess.run(
        [sys.executable, "-c", "import models"], cwd=work, env=env, capture_output=True, text=True
    )
    assert "No module named 'models'" in no_models.stderr
