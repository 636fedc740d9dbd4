"""Which kernels compute a run's bits, and on which device: the part of the machine's setup f needs.

``trainer.kernels: native`` computes with the machine's own kernels (a stream verifies on the same
kind of CPU); ``portable`` pins them before torch starts (training/environment.py, part of f only
for a portable run: prequel/program.py). This module imports torch only inside functions: `prequel`
imports it before torch starts.
"""

import sys

KERNEL_MODES = ("native", "portable")


class KernelError(RuntimeError):
    """This process cannot compute the bits the run or stream needs; the message says why."""


def ensure_kernels(mode: str) -> None:
    """Make sure this process computes with `mode`'s kernels, before any bit is computed."""
    if mode not in KERNEL_MODES:
        raise KernelError(f"kernel mode {mode!r} is not one of {', '.join(KERNEL_MODES)}")
    if mode == "portable":
        from prequel.training.environment import ensure_portable

        ensure_portable()
    elif "prequel.training.environment" in sys.modules:  # a portable run came first in this process
        sys.modules["prequel.training.environment"].use_fixed_products(False)


def device_of(accelerator: str) -> str:
    import torch

    if accelerator == "gpu" and not torch.cuda.is_available():
        raise KernelError(
            "trainer.accelerator: gpu, but torch sees no CUDA device on this machine (use trainer.accelerator: cpu)"
        )
    return "cuda" if accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available()) else "cpu"
