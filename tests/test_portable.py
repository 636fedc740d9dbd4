"""Portable proofs: a stream written on one x86-64 machine verifies on another, and a mismatch
is refused up front with a clear error (exit 3, no traceback, no output file).

The pins act when torch starts, so every check here runs train.py in its own process, with an
environment chosen per test (the test process itself computes with portable kernels)."""

import os
import subprocess
import sys

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from prequel.models import portable_math
from prequel.program import code_hash
from prequel.training import environment
from prequel.training.stream import encode_stream, read_stream
from tests.helpers import ROOT, run_cli, tiny_config

FIXTURE = ROOT / "tests" / "fixtures" / "portable.prequel"
FIXTURE_BYTES = (ROOT / "data" / "tinyshakespeare.txt").read_bytes()[:3000]
# What a user's shell might hold: kernels that differ from both the pins and the machine's own.
HOSTILE = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}


def unpinned(**extra: str) -> dict:
    """This process's environment without any kernel pin (a fresh shell), plus `extra`."""
    return {k: v for k, v in os.environ.items() if k not in environment.KERNEL_VARIABLES} | extra


def cli(*args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )


def test_the_committed_fixture_verifies_on_this_machine(tmp_path):
    """Written on another machine (see tests/fixtures/make_portable_stream.py): if this fails with
    anything but a code-hash message, the kernel pins are incomplete. Do not regenerate it."""
    if read_stream(FIXTURE).header["code_hash"] != code_hash():
        pytest.fail(
            "the program f changed since tests/fixtures/portable.prequel was written: regenerate it with "
            "`python tests/fixtures/make_portable_stream.py` and commit it"
        )
    out = tmp_path / "decoded.txt"
    r = cli("verify", FIXTURE, "--out", out, env=unpinned(**HOSTILE))  # verify re-executes with the pins itself
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().endswith("OK") and "warning" not in r.stdout
    assert out.read_bytes() == FIXTURE_BYTES


def test_a_portable_stream_records_its_pins(tmp_path):
    env = read_stream(FIXTURE).header["environment"]
    assert env["kernels"] == "portable" and env["cpu_capability"] == environment.PORTABLE_CAPABILITY
    assert env["kernel_env"] == environment.PORTABLE_PINS
    assert env["cpu_model"] and env["mkl"] and env["onednn"]
    assert FIXTURE.stat().st_size < 100_000


@pytest.fixture(scope="module")
def native_run(tmp_path_factory):
    """A tiny run with the machine's own kernels, trained in a fresh process."""
    root = tmp_path_factory.mktemp("native")
    text = root / "text.txt"
    text.write_bytes(FIXTURE_BYTES)
    r = cli(
        "--config",
        "configs/tiny.yaml",
        "--trainer.kernels",
        "native",
        "--data.path",
        text,
        "--run_dir",
        root / "run",
        "--logging.progress_bar",
        "false",
        env=unpinned(),
    )
    assert r.returncode == 0, r.stderr
    capability = read_stream(root / "run" / "stream.prequel").header["environment"]["cpu_capability"]
    other = "avx2" if capability == "DEFAULT" else "default"  # kernels this machine can run, but not the encoder's
    return root, text, other


def test_a_native_stream_under_other_kernels_is_refused_before_decoding(native_run):
    root, _, other = native_run
    out = root / "refused.txt"
    r = cli("verify", root / "run", "--out", out, env=unpinned(ATEN_CPU_CAPABILITY=other))
    assert r.returncode == 3, r.stdout + r.stderr
    assert "environment mismatch" in r.stderr and "cpu_capability: stream has" in r.stderr
    assert "Portable mode (trainer.kernels: portable)" in r.stderr
    assert "Traceback" not in r.stderr and "decoded" not in r.stdout and not out.exists()


def test_a_native_stream_verifies_where_the_kernels_match(native_run):
    root, text, _ = native_run
    out = root / "same.txt"
    r = cli("verify", root / "run", "--out", out, env=unpinned())
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == text.read_bytes()


def test_an_allowed_mismatch_that_drifts_names_the_batch(native_run):
    root, _, other = native_run
    out = root / "drift.txt"
    r = cli("verify", root / "run", "--out", out, "--allow-env-mismatch", env=unpinned(ATEN_CPU_CAPABILITY=other))
    assert r.returncode == 3, r.stdout + r.stderr
    assert "batch" in r.stderr and "the environment differs from the encoder's: cpu_capability" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_a_gpu_stream_on_a_machine_without_one_is_refused(tmp_path):
    stream = read_stream(FIXTURE)
    stream.header["environment"].update(device="cuda", gpu="NVIDIA H100 80GB HBM3")
    stream.header["config"]["trainer"]["accelerator"] = "gpu"
    path = tmp_path / "gpu.prequel"
    path.write_bytes(encode_stream(stream))
    for extra in ([], ["--allow-env-mismatch"]):
        r = run_cli("verify", path, "--out", tmp_path / "out.txt", *extra)
        assert r.returncode == 3, r.stdout + r.stderr
        assert "written on a GPU (NVIDIA H100 80GB HBM3)" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out.txt").exists()


def test_a_library_caller_without_the_pins_gets_a_clear_error(tmp_path):
    """No re-exec outside the CLI: a process whose torch started unpinned cannot compute portable bits."""
    code = (
        "import torch; from training import environment\n"
        "try:\n    environment.ensure_kernels('portable')\n"
        "except environment.KernelError as e:\n    print('refused:', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=unpinned())
    assert "refused: portable kernels must be chosen before torch starts" in r.stdout, r.stderr


def test_portable_compress_decompresses_under_other_kernels(native_run, tmp_path):
    root, text, other = native_run
    packed, unpacked = tmp_path / "text.pqz", tmp_path / "text.out"
    r = cli("compress", "--ckpt", root / "run", "--kernels", "portable", text, packed, env=unpinned())
    assert r.returncode == 0, r.stderr
    assert read_stream(packed).header["environment"]["kernels"] == "portable"
    r = cli("decompress", "--ckpt", root / "run", packed, unpacked, env=unpinned(**HOSTILE))
    assert r.returncode == 0, r.stderr
    assert unpacked.read_bytes() == text.read_bytes()
    native = tmp_path / "native.pqz"
    assert cli("compress", "--ckpt", root / "run", text, native, env=unpinned()).returncode == 0
    r = cli("decompress", "--ckpt", root / "run", native, tmp_path / "n.out", env=unpinned(ATEN_CPU_CAPABILITY=other))
    assert r.returncode == 3 and "cpu_capability" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "n.out").exists()


class AtenOps(TorchDispatchMode):
    """Records the name of every ATen op called while it is active."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()
        self.overloads: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        self.overloads.add(str(func))
        return func(*args, **(kwargs or {}))


# What portable mode computes by the fixed-order kernels (as traced: "aten.mm.default", "aten.mm.out"),
# and every ATen op whose CPU kernel calls BLAS (MKL) or a fused kernel that does.
FIXED_PRODUCTS = {f"aten.{op}" if "." in op else f"aten.{op}.default" for op in environment.FIXED_PRODUCTS}
BLAS_OPS = {op.split(".")[0] for op in environment.FIXED_PRODUCTS + environment.REFUSED_PRODUCTS}
BLAS_OPS |= {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"}


@pytest.mark.parametrize("procedure", ["full", "incremental"])
def test_nothing_that_computes_bits_calls_mkl(tmp_path, procedure):
    """MKL's vector math (VML) is not the same on every CPU, even under MKL_CBWR=COMPATIBLE: the
    portable pins cannot make it so, so no bit may depend on it; and every matrix product is one that
    the fixed-order kernels compute (attention too: by its math path). Every ATen op of a run with every
    feature that computes bits on (RoPE, n-gram prior, z-loss, gradient clipping, replay, NormHead,
    tied embeddings), from building the model through Alice's stream to Bob's replay of it."""
    from prequel.alice.session import train
    from prequel.verify.verifier import verify

    text = tmp_path / "text.txt"
    text.write_bytes(FIXTURE_BYTES[:1200])
    config = tiny_config(
        text,
        tmp_path / "run",
        "--model.positions",
        "rope",
        "--model.ngram_order",
        "3",
        "--model.z_loss",
        "1e-4",
        "--optim.grad_clip",
        "1.0",
        "--optim.warmup_steps",
        "2",
        "--data.replay_steps",
        "1",
        "--stream.procedure",
        procedure,
        "--logging.csv",
        "false",
    )
    with AtenOps() as ops:
        train(config)
        report = verify(tmp_path / "run", tmp_path / "decoded.txt")  # raises if a bit differs
    assert report["complete"] and (tmp_path / "decoded.txt").read_bytes() == text.read_bytes()
    assert {"mm", "_fused_adamw_", "xlogy"} <= ops.names  # the trace saw the run
    assert not ops.names & portable_math.VML_OPS, f"ops MKL computes: {sorted(ops.names & portable_math.VML_OPS)}"
    blas = {o for o in ops.overloads if o.split(".")[1] in BLAS_OPS}  # (in-place forms: "addmm_" is listed)
    assert "aten.bmm.default" in blas and blas <= FIXED_PRODUCTS, f"products MKL computes: {blas - FIXED_PRODUCTS}"
    assert environment._products is not None  # and those went to the fixed kernels


def test_vml_ops_lists_every_op_mkl_compatible_changes():
    """models/portable_math.VML_OPS is measured, not guessed: bench/vml_ops.py runs each candidate
    op with and without MKL_CBWR=COMPATIBLE and every op whose bits change must be listed."""
    r = subprocess.run([sys.executable, "bench/vml_ops.py"], cwd=ROOT, capture_output=True, text=True, env=unpinned())
    assert r.returncode == 0 and "lists them all" in r.stdout, r.stdout + r.stderr
