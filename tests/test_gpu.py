"""On a CUDA device (skipped elsewhere): attention by a deterministic kernel, training that replays
bit for bit, and a bf16 stream with the chunked head that verifies in another process."""

import lightning as L
import pytest
import torch

from prequel.alice.session import train
from prequel.training.run import set_determinism
from tests.helpers import ROOT, run_cli, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
GPU = ("--trainer.accelerator", "gpu", "--trainer.kernels", "native")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes((ROOT / "data" / "tinyshakespeare.txt").read_bytes()[:4000])
    return path


def test_attention_runs_the_math_kernel_and_two_runs_end_with_the_same_weights(text_file, tmp_path):
    weights = []
    for name in ("a", "b"):
        config = tiny_config(text_file, tmp_path / name, *GPU, "--stream.enabled", "false")
        set_determinism(config)
        assert not torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.mem_efficient_sdp_enabled()
        train(config)
        state = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        weights.append(state)
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_bf16_stream_with_the_chunked_head_verifies_in_another_process(text_file, tmp_path):
    run_dir = tmp_path / "run"
    summary = train(
        tiny_config(text_file, run_dir, *GPU, "--trainer.precision", "bf16-mixed", "--model.head_chunk", "48")
    )
    assert summary["code/n_bits"] == 4000
    out = tmp_path / "out.txt"
    r = run_cli("verify", run_dir, "--out", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == text_file.read_bytes()


class NoSyncBetweenLogs(L.Callback):
    """Turns CUDA's sync debug mode to "error" for the steps that neither log nor checksum, from this
    callback's batch start to its batch end (listed last: after the other callbacks' batch-start hooks,
    before none of their batch-end ones): an op there that torch flags as synchronizing (a blocking
    copy to the host, .item(), nonzero, a stream sync) raises. Explicit event waits are not flagged."""

    def __init__(self, every: int):
        self.every, self.checked = every, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        quiet = batch_idx % self.every not in (0, self.every - 1)  # neither this step's nor the last's hooks log
        torch.cuda.set_sync_debug_mode("error" if quiet else "default")
        self.checked += quiet

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        torch.cuda.set_sync_debug_mode("default")  # the hooks after this one may log


def test_steps_between_log_intervals_never_wait_for_the_device(text_file, tmp_path):
    """The hot path with the stream on: the batch stays on the host, Σ and the curve stay on the
    device, the stream's integers leave by non-blocking copies (issue 30)."""
    every = 10
    watch = NoSyncBetweenLogs(every)
    overrides = ("--trainer.log_every_n_steps", str(every), "--stream.checksum_every", "1000")
    try:
        summary = train(tiny_config(text_file, tmp_path / "run", *GPU, *overrides), [watch])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert summary["code/n_bits"] == 4000 and watch.checked > 10
