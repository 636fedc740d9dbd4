"""The bench scripts still run against the code they measure (seconds-long, tiny config)."""

import subprocess
import sys

import pytest

from tests.helpers import ROOT, TINY

SCRIPTS = {
    "gpu.py": (["--steps", "3", "--warmup", "2", "--verify-steps", "3", "--trainer.accelerator", "cpu"], "(c)/(a)"),
    "step_overhead.py": (["--steps", "3", "--warmup", "1", "--repeats", "1"], "ratio"),
    "stream_speed.py": (
        ["--tokens", "1500", "--warmup", "2", "--repeats", "1", "--decode-tokens", "800"],
        "decode / train time",
    ),
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_bench_script_runs_on_the_tiny_config(script, text_file):
    args, expected = SCRIPTS[script]
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--config", str(TINY), *args, "--data.path", str(text_file)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert expected in result.stdout and "nan" not in result.stdout.lower()


def test_the_coder_bench_runs_and_reports_its_goals():
    args = ["--vocab", "256", "4096", "--steps", "512", "--d", "32", "--repeats", "1"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "coder.py"), *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "encode at 512 tokens a step: slowest" in result.stdout and "decode at 512" in result.stdout
