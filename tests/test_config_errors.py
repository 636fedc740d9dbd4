"""Config and data errors: every bad key, type, value, YAML file or data path is named, clearly,
before a run directory exists. (Faults during training: tests/test_reliability.py.)"""

import dataclasses
import os
import typing

import pytest

from prequel.checks.settings import NON_NEGATIVE_KEYS, POSITIVE_KEYS, Config, ConfigError, load_config
from tests.helpers import ROOT, TINY, run_main

SHAKESPEARE = (ROOT / "data" / "tinyshakespeare.txt").read_bytes()


# --- config and data: clear errors before anything is created ----------------------------------


def leaf_fields(cls=Config, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        elif f"{prefix}{f.name}" != "model.vocab_size":  # derived from the tokenizer, refused by name
            yield f"{prefix}{f.name}", hints[f.name]


def test_every_field_refuses_a_wrong_type_by_key_and_value():
    for key, hint in leaf_fields():
        with pytest.raises(ConfigError) as e:
            load_config(TINY, [f"--{key}", "[1, 2]"])
        assert key in str(e.value) and "[1, 2]" in str(e.value), (key, str(e.value))
        if hint is float:
            assert f"{key}: expected a finite number, got nan" in config_error(key, ".nan")
        if typing.get_origin(hint) is typing.Literal:
            allowed = ", ".join(map(repr, typing.get_args(hint)))
            assert f"{key}: 'bogus' is not one of {allowed}" in config_error(key, "bogus")
    for key in POSITIVE_KEYS:
        assert f"{key}: must be > 0, got 0" in config_error(key, "0")
    for key in NON_NEGATIVE_KEYS:
        assert f"{key}: must be >= 0, got -1" in config_error(key, "-1")


def config_error(key: str, value: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [f"--{key}", value])
    return str(e.value)


YAML_CASES = {
    "a list, not a mapping": ("- model\n- data\n", "expected a mapping of config keys at the top level, got a list"),
    "invalid YAML": ("model: {n_layer: 2\n", "is not valid YAML"),
    "a python tag (safe_load only)": ("seed: !!python/object/apply:os.getpid []\n", "is not valid YAML"),
    "unknown nested key": ("optim:\n  momentum: 0.9\n", "unknown config key optim.momentum (known: lr, "),
    "misspelt key": ("model:\n  n_layers: 2\n", "unknown config key model.n_layers (did you mean model.n_layer?)"),
    "a section that is not a mapping": ("model: 3\n", "model: expected a mapping, got 3"),
    "wrong type": ("trainer:\n  max_steps: many\n", "trainer.max_steps: expected an integer, got 'many'"),
    "bool for an int": ("model:\n  n_layer: true\n", "model.n_layer: expected an integer, got True"),
    "negative value": ("optim:\n  lr: -0.001\n", "optim.lr: must be > 0, got -0.001"),
    "bad literal": ("trainer:\n  precision: fp8\n", "trainer.precision: 'fp8' is not one of '32-true', '64-true'"),
    "seed out of range": ("seed: -1\n", "seed: must be in [0, 2**32 - 1], got -1"),
    "beta of 1": ("optim:\n  beta2: 1.0\n", "optim.beta2: must be in [0, 1), got 1.0"),
    "infinite number": ("optim:\n  lr: .inf\n", "optim.lr: expected a finite number, got inf"),
    "derived key": ("model:\n  vocab_size: 300\n", "model.vocab_size cannot be set: it is set by the tokenizer"),
    "heads do not divide width": ("model:\n  n_head: 3\n", "model.n_embd (128) must be divisible by model.n_head (3)"),
    "context as long as a block": (
        "model:\n  block_size: 16\ndata:\n  context: 16\n",
        "data.context (16) must be less than model.block_size (16)",
    ),
    "context with the incremental coder": (
        "data:\n  context: 4\nstream:\n  enabled: true\n  procedure: incremental\n",
        "data.context needs stream.procedure: full",
    ),
}


@pytest.mark.parametrize("case", YAML_CASES)
def test_bad_config_files_are_named_and_create_nothing(case, text_file, tmp_path):
    body, message = YAML_CASES[case]
    config = tmp_path / "bad.yaml"
    config.write_text(body)
    rc, _, err = run_main("--config", config, "--data.path", text_file, "--run_dir", tmp_path / "run")
    assert rc == 2 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "run").exists()


def test_unreadable_config_files(tmp_path):
    rc, _, err = run_main("--config", tmp_path / "nope.yaml")
    assert rc == 2 and f"config file not found: {tmp_path / 'nope.yaml'}" in err
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00binary")
    rc, _, err = run_main("--config", tmp_path / "binary.yaml")
    assert rc == 2 and "cannot read config file" in err and "binary.yaml" in err


def test_bad_data_fails_before_the_run_directory_exists(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "short.txt").write_bytes(b"To be, or not to be")  # 19 bytes < block_size 32
    (tmp_path / "nofiles").mkdir()
    cases = {
        tmp_path / "missing.txt": "data.path: file not found",
        tmp_path / "empty.txt": "is empty (no bytes to train on)",
        tmp_path / "short.txt": "corpus too short: 19 tokens, less than one sequence (model.block_size = 32)",
        tmp_path / "nofiles": "has no files",
        tmp_path / "*.none": "matches no files",
    }
    for i, (path, message) in enumerate(cases.items()):
        rc, _, err = run_main("--config", TINY, "--data.path", path, "--run_dir", tmp_path / f"run{i}")
        assert rc == 2 and message in err, err
        assert not (tmp_path / f"run{i}").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file anyway")
def test_unreadable_data_file(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_bytes(SHAKESPEARE[:1000])
    path.chmod(0)
    rc, _, err = run_main("--config", TINY, "--data.path", path, "--run_dir", tmp_path / "run")
    assert rc == 2 and "cannot read" in err and "Permission denied" in err
    assert not (tmp_path / "run").exists()
