"""f is a decoder: its files alone, as |f| counts them, decode a stream, and nothing else of ours is needed."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from prequel import program
from prequel.alice.session import train
from prequel.program import F_PACKAGES, FEATURES, NOT_F, code_hash, source_bundle, source_files, strip_python
from prequel.training.environment import portable_environ
from prequel.training.header import TrainingHeader
from prequel.training.stream import read_stream
from prequel.verify.verifier import STREAM_NAME
from tests.helpers import ROOT, tiny_config

FIXTURE = ROOT / "tests" / "fixtures" / "portable.prequel"

# Bob, in a directory that holds only f (comments and docstrings stripped, as counted), decodes a
# stream with f's own entry points, then lists the files of every module he loaded.
DECODE_AND_LIST = """
import json, sys
from pathlib import Path
from prequel.training.header import TrainingHeader
from prequel.training.run import decode, receiver
from prequel.training.stream import read_stream
stream = read_stream(Path(sys.argv[1]))
bob = receiver(TrainingHeader.from_dict(stream.header))
tape, _, _ = decode(bob, stream)
data = b"".join(tape.decoded(bob.tokenizer))
files = [Path(m.__file__) for m in list(sys.modules.values()) if getattr(m, "__file__", None)]
files = [p.resolve() for p in files if p.is_absolute()]  # (some torch modules have a bare file name)
print(json.dumps({"data": data.hex(), "files": [p.as_posix() for p in files if ".venv" not in p.parts]}))
"""


def assert_f_alone_decodes(stream_path: Path, tmp_path: Path) -> None:
    """The run's f, copied as counted into an empty directory, decodes the stream there to its
    data, loading exactly f's modules: none outside f, and none of f that the run does not need."""
    config = TrainingHeader.from_dict(read_stream(stream_path).header).program()
    bob = tmp_path / "bob"
    for name, path in source_files(config).items():
        target = bob / "prequel" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(strip_python(path.read_text()))
    r = subprocess.run(
        [sys.executable, "-c", DECODE_AND_LIST, str(stream_path)],
        cwd=bob,
        env=portable_environ(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    data = bytes.fromhex(out["data"])
    assert hashlib.sha256(data).hexdigest() == read_stream(stream_path).trailer["data_sha256"]
    ours = {p for p in out["files"] if p.startswith(ROOT.as_posix() + "/")}
    assert not ours, f"decoding needed files outside f: {sorted(ours)}"
    package = (bob / "prequel").resolve().as_posix()
    loaded = {p[len(package) + 1 :] for p in out["files"] if p.startswith(package + "/")}
    counted = set(source_files(config))
    assert loaded == counted, f"in f but not needed: {sorted(counted - loaded)}; loaded: {sorted(loaded)}"


def test_f_alone_as_counted_decodes_the_fixture_and_imports_exactly_its_modules(tmp_path):
    config = TrainingHeader.from_dict(read_stream(FIXTURE).header).program()
    features = set(source_files(config)) & set(FEATURES)
    assert features == {"training/environment.py", "training/fixed_gemm.py"}  # the core, the portable pins and GEMM
    assert_f_alone_decodes(FIXTURE, tmp_path)


@pytest.mark.parametrize(
    "settings",
    [
        # every module FEATURES lists (and leaves out), in two runs: a mixture refuses the n-gram prior
        (
            "--model.ngram_order",
            "2",
            "--data.tokenizer",
            "bpe",
            "--data.vocab_size",
            "300",
            "--data.curriculum",
            "difficulty",
            "--data.context",
            "4",
        ),
        ("--mixture.members", "1x2x16, 1x2x32", "--data.curriculum", "shuffle", "--trainer.kernels", "native"),
    ],
    ids=["ngram-bpe-difficulty-portable", "mixture-shuffle-native"],
)
def test_a_runs_f_holds_the_modules_its_settings_need_and_decodes_it_alone(tmp_path, settings):
    text = tmp_path / "text.txt"
    text.write_bytes((ROOT / "data" / "tinyshakespeare.txt").read_bytes()[:3000])
    config = tiny_config(text, tmp_path / "run", *settings)
    needed = {name for name, needs in FEATURES.items() if needs(config)}
    assert needed and set(source_files(config)) >= needed
    train(config)
    assert_f_alone_decodes(tmp_path / "run" / STREAM_NAME, tmp_path)


def test_the_counted_source_is_the_stripped_files_and_the_dependency_pins():
    bundle = source_bundle()
    for name, path in source_files().items():
        body = strip_python(path.read_text()).encode()
        assert f"prequel/{name}\n{len(body)}\n".encode() + body in bundle
    assert b"torch==2.13.0" in bundle and b"pytest" not in bundle  # Bob's pins only, not the developers' extras


def test_f_is_the_prequel_package_its_decoder_imports():
    files = source_files()
    assert {"__init__.py", "models/gpt.py", "training/module.py", "callbacks/arithmetic_stream.py"} <= set(files)
    assert not set(files) & set(NOT_F) and all(p.is_file() for p in files.values())
    assert {p.parent.name for name, p in files.items() if "/" in name} == set(F_PACKAGES)


def test_a_comment_or_docstring_edit_of_f_leaves_the_code_hash_unchanged_and_code_changes_it(tmp_path, monkeypatch):
    """Comments are free: the hash covers what |f| counts (stripped source), so f's prose can be fixed."""
    files = source_files()
    original = code_hash()
    edited = tmp_path / "module.py"
    source = files["training/module.py"].read_text()
    edited.write_text(
        source.replace('"""The LightningModule', '"""A reworded docstring. The LightningModule', 1).replace(
            "\nclass CodedBatch", "\n# a new comment line\n\n\nclass CodedBatch", 1
        )
    )
    assert edited.read_text() != source

    def with_edit(config=None):
        return {**files, "training/module.py": edited}

    monkeypatch.setattr(program, "source_files", with_edit)
    assert code_hash() == original
    edited.write_text(source.replace("mask = y != IGNORE", "mask = IGNORE != y", 1))
    assert edited.read_text() != source and code_hash() != original
