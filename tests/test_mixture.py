"""A mixture of sizes trained side by side (models/mixture.py): its stream verifies in another
process, it codes within log2 K bits of its best member (Bayes), and each member trains exactly
as it would alone."""

import math
import re

import pytest

from prequel.alice.session import train
from prequel.checks.settings import ConfigError
from tests.helpers import ROOT, run_cli, tiny_config

TEXT = (ROOT / "data" / "tinyshakespeare.txt").read_bytes()[:1500]
MEMBERS = ["--mixture.members", "1x2x16@3e-3, 1x2x32"]  # the second: tiny.yaml's own model (lr from optim.lr)


@pytest.fixture(scope="module")
def text_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixture") / "text.txt"
    path.write_bytes(TEXT)
    return path


@pytest.mark.parametrize("weights,procedure", [("bayes", "full"), ("switch", "incremental")])
def test_a_mixture_stream_verifies_in_a_separate_process(text_path, tmp_path, weights, procedure):
    summary = train(
        tiny_config(
            text_path,
            tmp_path / "run",
            *MEMBERS,
            "--mixture.weights",
            weights,
            "--stream.procedure",
            procedure,
            "--logging.csv",
            "false",
        )
    )
    assert summary["model/params"] == sum(summary["mixture/member_params"])
    r = run_cli("verify", tmp_path / "run", "--out", tmp_path / "decoded.txt")
    assert r.returncode == 0 and "OK" in r.stdout.split(), r.stdout + r.stderr
    assert "final weights are bitwise equal" in r.stdout  # the members and the mixture weights (a buffer)
    assert (tmp_path / "decoded.txt").read_bytes() == TEXT
    assert summary["code/stream_bits"] <= summary["code/data_bits"] + summary["stream/padding_bits"]  # costs Σ


def test_bayes_codes_within_log2_k_of_its_best_member_and_members_train_as_alone(text_path, tmp_path):
    mix = train(tiny_config(text_path, tmp_path / "mix", *MEMBERS, "--stream.enabled", "false"))
    members = mix["mixture/member_bits"]
    assert mix["code/data_bits"] <= min(members) + math.log2(len(members)) + 1e-3  # float32 rounding of ~1e-7/token
    assert mix["code/data_bits"] > min(members) - 50  # a mixture, not a cheat: close to the best member
    for width, bits in zip((16, 32), members):  # each member alone, same seed, same batches: the same bits
        alone = train(
            tiny_config(
                text_path, tmp_path / f"alone{width}", "--model.n_embd", str(width), "--stream.enabled", "false"
            )
        )
        assert alone["code/data_bits"] == bits


def test_switching_beats_every_member_here(text_path, tmp_path):
    """Fixed share lets the weight move to whichever member predicts best now (at 1,500 bytes the
    small member leads early, the big one later)."""
    mix = train(
        tiny_config(
            text_path,
            tmp_path / "run",
            *MEMBERS,
            "--mixture.weights",
            "switch",
            "--mixture.switch_rate",
            "0.05",
            "--stream.enabled",
            "false",
        )
    )
    assert mix["code/data_bits"] < min(mix["mixture/member_bits"])


@pytest.mark.parametrize(
    "members,message",
    [
        ("2x4x64", "needs 2..8 members"),
        ("2x4x64, 3by4", "'3by4' is not LAYERSxHEADSxWIDTH[@LR]"),
        ("2x3x64, 1x2x32", "width divisible by heads"),
        ("1x2x32@fast, 1x2x16", "is not LAYERSxHEADSxWIDTH[@LR]"),
    ],
)
def test_bad_members_are_refused_by_name(text_path, tmp_path, members, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        tiny_config(text_path, tmp_path / "run", "--mixture.members", members)
    with pytest.raises(ConfigError, match="needs model.ngram_order: 0"):
        tiny_config(text_path, tmp_path / "run", *MEMBERS, "--model.ngram_order", "2")
    with pytest.raises(ConfigError, match="needs trainer.devices: 1"):
        tiny_config(text_path, tmp_path / "run", *MEMBERS, "--trainer.devices", "2", "--stream.enabled", "false")


def test_compress_refuses_a_mixture_checkpoint_by_name(text_path, tmp_path):
    train(tiny_config(text_path, tmp_path / "run", *MEMBERS, "--trainer.max_steps", "3", "--stream.enabled", "false"))
    r = run_cli("compress", "--ckpt", tmp_path / "run", text_path, tmp_path / "out.pqz")
    assert r.returncode != 0 and "holds a mixture of" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out.pqz").exists()
