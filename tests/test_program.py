"""f is a decoder: its files alone, as |f| counts them, decode a stream, and nothing else of ours is needed."""

import hashlib
import json
import subprocess
import sys

from tests.helpers import ROOT
from tools.program import source_bundle, source_files, strip_python
from training.environment import portable_environ
from training.stream import read_stream

FIXTURE = ROOT / "tests" / "fixtures" / "portable.prequel"

# Bob, in a directory that holds only f (comments and docstrings stripped, as counted), decodes the
# committed fixture with f's own entry points, then lists the files of every module he loaded.
DECODE_AND_LIST = f"""
import json, sys
from pathlib import Path
from training.header import TrainingHeader
from training.run import decode, receiver
from training.stream import read_stream
stream = read_stream(Path({str(FIXTURE)!r}))
data, _, _ = decode(receiver(TrainingHeader.from_dict(stream.header)), stream)
files = [Path(m.__file__) for m in list(sys.modules.values()) if getattr(m, "__file__", None)]
files = [p.resolve() for p in files if p.is_absolute()]  # (some torch modules have a bare file name)
print(json.dumps({{"data": data.hex(), "files": [p.as_posix() for p in files if ".venv" not in p.parts]}}))
"""


def test_f_alone_as_counted_decodes_the_fixture_and_imports_exactly_its_modules(tmp_path):
    for path in source_files():
        target = tmp_path / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(strip_python(path.read_text()))
    r = subprocess.run([sys.executable, "-c", DECODE_AND_LIST], cwd=tmp_path, env=portable_environ(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    data = bytes.fromhex(out["data"])
    assert hashlib.sha256(data).hexdigest() == read_stream(FIXTURE).trailer["data_sha256"]
    ours = {p for p in out["files"] if p.startswith(ROOT.as_posix() + "/")}
    assert not ours, f"decoding needed files outside f: {sorted(ours)}"
    loaded = {p[len(tmp_path.resolve().as_posix()) + 1:] for p in out["files"]
              if p.startswith(tmp_path.resolve().as_posix() + "/")}
    counted = {p.relative_to(ROOT).as_posix() for p in source_files()}
    assert loaded == counted, f"in f but not needed: {sorted(counted - loaded)}; loaded: {sorted(loaded)}"


def test_the_counted_source_is_the_stripped_files_and_the_dependency_pins():
    bundle = source_bundle(stripped=True)
    for path in source_files():
        body = strip_python(path.read_text()).encode()
        assert f"{path.relative_to(ROOT).as_posix()}\n{len(body)}\n".encode() + body in bundle
    assert b"torch==2.13.0" in bundle and b"[tool" not in bundle  # pins only, not the developers' settings
