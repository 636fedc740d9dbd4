"""What in the machine changes the bits of training, and how `portable` mode pins it.

The same program on another CPU can round differently: torch picks ATen kernels by the CPU's
instruction set (AVX-512 or AVX2), oneDNN picks its own, and MKL picks a code path by ISA *and by
vendor*. On an Intel AVX-512 machine `small.yaml` gives a different Σ than on an AMD one or an
AVX2 one, and a stream decodes only where the encoder's kernels run.

``trainer.kernels: portable`` fixes every choice before torch starts:

* ``ATEN_CPU_CAPABILITY=avx2``: ATen's vectorised kernels (softmax, layer norm, GELU, reductions)
  use 8-lane AVX2 code on any x86-64 CPU that has AVX2 (all since 2013 from both vendors).
* ``ONEDNN_MAX_CPU_ISA=AVX2``: the same for oneDNN's JIT kernels.
* ``MKL_CBWR=COMPATIBLE``: MKL's one code path that its documentation promises gives the same
  results on Intel and non-Intel CPUs (every other CNR branch is Intel-only; measured: MKL's AVX2
  branch on Intel does not reproduce an AMD machine's bits). It is an SSE2 path: the price of
  portable mode (README, "Portable kernels").
* ``MKL_DYNAMIC=FALSE``, ``OMP_DYNAMIC=FALSE``: the thread count is the one recorded, not one the
  libraries pick per call (MKL's reproducibility conditions).

These are environment variables that the libraries read once, when they start, so a process must
be *started* with them: `ensure_kernels` re-executes the command with them (a CLI or bench script), or
refuses (a library caller whose torch already runs other kernels). ``native`` leaves the machine's
own choices (faster) and records them, so a native stream verifies only where they are the same.

Pinned packages and the thread count are recorded in the stream header and checked before decoding,
in both modes (prequel/checks/machine.py: checks decide whether to decode, so they are not part of f).
A native run's f does not hold this module: `ensure_kernels` (training/kernels.py) imports it only
for portable kernels. It imports torch only inside functions: `prequel` imports it before torch starts.
"""

import os
import sys

from prequel.training.kernels import KERNEL_MODES, KernelError, device_of, ensure_kernels  # noqa: F401 (one import for callers)

PORTABLE_PINS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "COMPATIBLE",
    "MKL_DYNAMIC": "FALSE",
    "OMP_DYNAMIC": "FALSE",
}
PORTABLE_CAPABILITY = "AVX2"  # what torch.backends.cpu.get_cpu_capability() reports under the pins
# Other variables that change which kernels run: portable mode removes them.
KERNEL_VARIABLES = (
    *PORTABLE_PINS,
    "DNNL_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
    "MKL_DEBUG_CPU_TYPE",
    "ONEDNN_DEFAULT_FPMATH_MODE",
    "DNNL_DEFAULT_FPMATH_MODE",
)
_REEXEC_MARK = "PREQUEL_KERNELS_REEXEC"  # set in the re-executed process: never loop

_may_reexec = False


def allow_reexec() -> None:
    """Let `ensure_kernels` restart this process (same command line) with the pins: for CLI entry points."""
    global _may_reexec
    _may_reexec = True


def kernel_env(environ=os.environ) -> dict[str, str]:
    """The kernel-choosing variables that are set."""
    return {k: environ[k] for k in sorted(KERNEL_VARIABLES) if k in environ}


def pinned(mode: str, environ=os.environ) -> bool:
    return mode == "native" or kernel_env(environ) == PORTABLE_PINS


def portable_environ(environ=os.environ) -> dict[str, str]:
    env = {k: v for k, v in environ.items() if k not in KERNEL_VARIABLES}
    return env | PORTABLE_PINS


def ensure_portable() -> None:
    """Make sure this process computes with the pinned kernels (`ensure_kernels("portable")`)."""
    if not pinned("portable"):
        if _may_reexec and not os.environ.get(_REEXEC_MARK):
            sys.stdout.flush(), sys.stderr.flush()
            env = portable_environ() | {_REEXEC_MARK: "1"}
            os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
        raise KernelError(
            "portable kernels must be chosen before torch starts, and this process started without them "
            f"(kernel variables set: {kernel_env() or 'none'}); run it through the prequel command, which sets them, "
            "or start "
            f"Python with {' '.join(f'{k}={v}' for k, v in PORTABLE_PINS.items())}"
        )
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if capability != PORTABLE_CAPABILITY:
        raise KernelError(
            f"portable kernels need a CPU with AVX2; torch runs {capability} kernels here, "
            "so this machine cannot compute portable bits"
        )
