"""f is a folder: the decoder imports exactly f's modules, and f imports nothing else of ours."""

import json
import subprocess
import sys

from tests.helpers import ROOT
from training.program import F_PACKAGES, source_files

FIXTURE = ROOT / "tests" / "fixtures" / "portable.prequel"

# Bob decodes the committed fixture in a fresh process, then lists the project modules he loaded.
DECODE_AND_LIST = f"""
import json, sys, tempfile
from pathlib import Path
from training.run import verify
with tempfile.TemporaryDirectory() as tmp:
    verify({str(FIXTURE)!r}, Path(tmp) / "out")
root = Path({str(ROOT)!r})
files = [Path(m.__file__) for m in list(sys.modules.values()) if getattr(m, "__file__", None)]
mine = sorted(p.relative_to(root).as_posix() for p in files  # (some torch modules have a bare file name)
              if p.is_absolute() and p.is_relative_to(root) and ".venv" not in p.parts)
print(json.dumps(mine))
"""


def f_modules() -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in source_files() if p.suffix == ".py"}


def test_the_decoder_imports_exactly_the_modules_of_f():
    r = subprocess.run([sys.executable, "-c", DECODE_AND_LIST], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    loaded = set(json.loads(r.stdout.strip().splitlines()[-1]))
    assert loaded == f_modules(), f"loaded but not in f: {sorted(loaded - f_modules())}; " \
                                  f"in f but not needed: {sorted(f_modules() - loaded)}"


def test_importing_f_pulls_in_nothing_outside_f():
    modules = sorted(p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".") for p in source_files()
                     if p.suffix == ".py")
    code = (f"import sys; from pathlib import Path\nfor m in {modules!r}: __import__(m)\n"
            f"root = Path({str(ROOT)!r})\n"
            "files = [Path(mod.__file__) for mod in list(sys.modules.values()) if getattr(mod, '__file__', None)]\n"
            "print([p.as_posix() for p in files if p.is_absolute() and p.is_relative_to(root) and '.venv' not in p.parts "
            f"and p.relative_to(root).parts[0] not in {F_PACKAGES!r}])")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
