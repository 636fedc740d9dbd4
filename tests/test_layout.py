"""The layout says each concept once: one import name, no file name twice, no module too long to read."""

import json
import subprocess
import sys
from collections import defaultdict

from tests.helpers import ROOT

MAX_LINES = 400


def project_modules() -> list:
    """Every Python file the repository tracks (the package, train.py, examples, benches, tests)."""
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / name for name in tracked.stdout.split()]


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
