"""Alice's stream work off the training thread: the batch's integers leave the device without
blocking it, and one background thread codes them, in order.

Training on a GPU must not wait for the host: a `.cpu()` of the coded targets and intervals after
every step would drain the device's queue each time. `to_host` starts a non-blocking copy into
pinned memory and records a CUDA event; the `Worker`'s thread waits on that event, not the
training thread. Its queue holds at most `depth` batches, so a coder slower than training holds
training back (backpressure) instead of filling the host's memory. A job that fails stores its
error; the next `submit` or `drain` on the training thread raises it, so a broken stream stops
training at once and is never lost. On a CPU the tensors are already on the host, and the same
thread does the same work (so the CPU tests run this path).

Nothing here is part of f: it orders Alice's work, and the words it writes are the ones
`encode_known` would write in the training thread (tests/test_background.py).
"""

import queue
import threading
from collections.abc import Callable

import numpy as np
import torch

from prequel.training.stream import StreamError

DEPTH = 8  # batches queued at most before training waits for the coder


class HostCopy:
    """A tensor on its way to the host: `numpy()` waits for the copy (on the worker's thread)."""

    def __init__(self, tensor: torch.Tensor):
        self._event = None
        if tensor.device.type == "cpu":
            self._host = tensor
            return
        self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self._host.copy_(tensor, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def numpy(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
        return self._host.numpy()


def to_host(tensor: torch.Tensor | None) -> HostCopy | None:
    return None if tensor is None else HostCopy(tensor.detach())


class Worker:
    """Runs submitted jobs one by one, in order, on one thread; `depth` 0 runs them at once, inline."""

    def __init__(self, depth: int = DEPTH, name: str = "prequel-stream-encoder"):
        self.depth = depth
        self._error: BaseException | None = None
        self._failed_job = ""
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._thread = None
        if depth:
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    def submit(self, job: Callable[[], None], what: str) -> None:
        """Queue `job` (waits while `depth` jobs are queued); raises a failed earlier job's error."""
        self.raise_failure()
        if self._thread is None:
            self._call(job, what)
            self.raise_failure()
            return
        self._queue.put((job, what))

    def drain(self) -> None:
        """Wait until every queued job has run; raises if one failed."""
        if self._thread is not None:
            self._queue.join()
        self.raise_failure()

    def close(self) -> None:
        """Stop the thread once the queued jobs have run (or been skipped after a failure)."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._thread = None

    def raise_failure(self) -> None:
        if self._error is not None:
            raise StreamError(
                f"the stream encoder failed at {self._failed_job}: {type(self._error).__name__}: {self._error}"
            ) from self._error

    def _call(self, job: Callable[[], None], what: str) -> None:
        if self._error is not None:  # after a failure the rest is skipped: the stream is lost anyway
            return
        try:
            job()
        except BaseException as e:  # (any error: the training thread re-raises it)
            self._error, self._failed_job = e, what

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._call(*item)
            finally:
                self._queue.task_done()
