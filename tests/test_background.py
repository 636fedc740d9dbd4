"""Alice's background encoder (prequel/alice/background.py): the same stream as coding in the
hook, a bounded queue, and a failure that stops training, then resumes from a checkpoint."""

import json
import threading
import time

import pytest
import torch

from prequel.alice import background, encoder
from prequel.alice.background import Worker, to_host
from prequel.alice.session import train
from prequel.training.stream import StreamError
from tests.helpers import ROOT, tiny_config

TEXT = (ROOT / "data" / "tinyshakespeare.txt").read_bytes()[:6000]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes(TEXT)
    return path


def test_jobs_run_in_order_and_a_full_queue_holds_the_submitter_back():
    worker, done, release = Worker(depth=2), [], threading.Event()
    worker.submit(release.wait, "job 0")  # the thread is busy until released
    for i in range(1, 3):
        worker.submit(lambda i=i: done.append(i), f"job {i}")  # fills the queue (depth 2)
    fourth = threading.Thread(target=lambda: worker.submit(lambda: done.append(3), "job 3"))
    fourth.start()
    time.sleep(0.2)
    assert fourth.is_alive(), "a submit past the queue's depth must wait"
    release.set()
    fourth.join(5)
    worker.drain()
    assert done == [1, 2, 3]
    worker.close()


def test_a_failed_job_is_raised_on_the_next_submit_and_later_jobs_are_skipped():
    worker, done, go = Worker(depth=4), [], threading.Event()

    def fail():
        go.wait()
        raise ZeroDivisionError("division by zero")

    worker.submit(fail, "batch 7")
    worker.submit(lambda: done.append(1), "batch 8")  # queued before the failure: skipped
    go.set()
    with pytest.raises(StreamError, match="the stream encoder failed at batch 7: ZeroDivisionError"):
        worker.drain()
    with pytest.raises(StreamError, match="batch 7"):
        worker.submit(lambda: done.append(2), "batch 9")
    assert done == []
    worker.close()


def test_host_copy_of_a_cpu_tensor_is_the_tensor_itself():
    t = torch.arange(6).view(2, 3)
    assert to_host(t).numpy().tolist() == t.tolist() and to_host(None) is None


def test_background_and_inline_coding_write_the_same_stream(text_file, tmp_path, monkeypatch):
    """Segments sealed every 512 tokens (several a run, some while batches are still queued) and
    checkpoints every 4 steps: the same bytes whether the worker lags or codes in the hook."""
    monkeypatch.setattr(encoder, "SEGMENT_TOKENS", 512)
    streams = []
    for depth in (background.DEPTH, 0):
        monkeypatch.setattr(background, "DEPTH", depth)
        run_dir = tmp_path / f"depth{depth}"
        train(tiny_config(text_file, run_dir, "--trainer.checkpoint_every_n_steps", "4"))
        streams.append((run_dir / "stream.prequel").read_bytes())
    assert streams[0] == streams[1]


def test_a_failure_in_the_encoder_thread_stops_training_and_the_run_resumes(text_file, tmp_path, monkeypatch):
    args = ("--trainer.checkpoint_every_n_steps", "5")
    reference = tmp_path / "reference"
    train(tiny_config(text_file, reference, *args))

    real, calls = encoder.encode_known, []

    def failing(*a):
        calls.append(1)
        if len(calls) == 13:  # batch 13: after the checkpoint at step 10
            raise OSError("disk on fire")
        return real(*a)

    run_dir = tmp_path / "run"
    monkeypatch.setattr(encoder, "encode_known", failing)
    with pytest.raises(StreamError, match=r"the stream encoder failed at batch 13: OSError: disk on fire"):
        train(tiny_config(text_file, run_dir, *args))
    assert not (run_dir / "stream.prequel").exists() and not (run_dir / "summary.json").exists()
    assert not [t for t in threading.enumerate() if t.name == "prequel-stream-encoder"], "the thread is stopped"

    monkeypatch.setattr(encoder, "encode_known", real)
    summary = train(tiny_config(text_file, run_dir, *args))  # the same command: resumes from step 10
    assert summary["code/data_bits"] == pytest.approx(
        json.loads((reference / "summary.json").read_text())["code/data_bits"], rel=1e-9
    )
    assert (run_dir / "stream.prequel").read_bytes() == (reference / "stream.prequel").read_bytes()
