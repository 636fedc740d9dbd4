"""What in the machine changes the bits of training, how `portable` mode pins it, and the check.

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

Pinned packages and the thread count are recorded and checked in both modes. This module imports
torch only inside functions: `train.py` imports it before torch starts.
"""

import json
import os
import platform
import sys
from importlib.metadata import version

KERNEL_MODES = ("native", "portable")
PORTABLE_PINS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "COMPATIBLE",
    "MKL_DYNAMIC": "FALSE",
    "OMP_DYNAMIC": "FALSE",
}
PORTABLE_CAPABILITY = "AVX2"  # what torch.backends.cpu.get_cpu_capability() reports under the pins
# Other variables that change which kernels run: portable mode removes them.
KERNEL_VARIABLES = (*PORTABLE_PINS, "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE",
                    "ONEDNN_DEFAULT_FPMATH_MODE", "DNNL_DEFAULT_FPMATH_MODE")
_REEXEC_MARK = "PREQUEL_KERNELS_REEXEC"  # set in the re-executed process: never loop

# Facts that change the bits of training, by mode; the rest of `facts()` is informational.
BIT_FACTS = ("torch", "lightning", "constriction", "numpy", "machine", "num_threads", "device", "kernels",
             "cpu_capability", "kernel_env", "mkl", "onednn")
NATIVE_BIT_FACTS = ("cpu_model",)  # native kernels may depend on the exact CPU
GPU_BIT_FACTS = ("gpu",)


class KernelError(RuntimeError):
    """This process cannot compute the bits the run or stream needs; the message says why."""


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


def ensure_kernels(mode: str) -> None:
    """Make sure this process computes with `mode`'s kernels, before any bit is computed."""
    if mode not in KERNEL_MODES:
        raise KernelError(f"kernel mode {mode!r} is not one of {', '.join(KERNEL_MODES)}")
    if not pinned(mode):
        if _may_reexec and not os.environ.get(_REEXEC_MARK):
            sys.stdout.flush(), sys.stderr.flush()
            env = portable_environ() | {_REEXEC_MARK: "1"}
            os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
        raise KernelError(
            "portable kernels must be chosen before torch starts, and this process started without them "
            f"(kernel variables set: {kernel_env() or 'none'}); run it through train.py, which sets them, or start "
            f"Python with {' '.join(f'{k}={v}' for k, v in PORTABLE_PINS.items())}")
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if mode == "portable" and capability != PORTABLE_CAPABILITY:
        raise KernelError(f"portable kernels need a CPU with AVX2; torch runs {capability} kernels here "
                          f"({cpu_model()}), so this machine cannot compute portable bits")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo); `platform.processor()` is empty on Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _library_versions() -> dict[str, str]:
    """MKL's and oneDNN's versions as torch reports its build (they are linked into torch)."""
    import torch

    found = {"mkl": "none", "onednn": "none"}
    for line in torch.__config__.show().splitlines():
        line = line.strip(" -")
        if "Math Kernel Library Version" in line:
            found["mkl"] = line.split("Version", 1)[1].split("-")[0].strip()
        elif line.startswith("Intel(R) MKL-DNN") or line.startswith("Intel(R) oneDNN"):
            found["onednn"] = line.split(" (")[0].split()[-1]
    return found


def device_of(accelerator: str) -> str:
    import torch

    if accelerator == "gpu" and not torch.cuda.is_available():
        raise KernelError("trainer.accelerator: gpu, but torch sees no CUDA device on this machine "
                          "(use trainer.accelerator: cpu)")
    return "cuda" if accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available()) else "cpu"


def facts(kernels: str, accelerator: str) -> dict:
    """Everything recorded in a stream header about where its bits were computed."""
    import lightning
    import torch

    device = device_of(accelerator)
    out = {
        "torch": torch.__version__, "lightning": lightning.__version__, "constriction": version("constriction"),
        "numpy": version("numpy"), "python": platform.python_version(), "machine": platform.machine(),
        "libc": " ".join(platform.libc_ver()) or "unknown", "num_threads": torch.get_num_threads(),
        "device": device, "kernels": kernels, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_model": cpu_model(), "kernel_env": kernel_env(), **_library_versions(),
    }
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
    return out


def bit_facts(recorded: dict) -> tuple[str, ...]:
    keys = BIT_FACTS
    if recorded.get("kernels", "native") != "portable":
        keys += NATIVE_BIT_FACTS
    if recorded.get("device") == "cuda":
        keys += GPU_BIT_FACTS
    return keys


def differences(recorded: dict, here: dict) -> list[str]:
    """Each bit fact that differs, as 'key: stream has X, here Y'."""
    def show(v):
        return json.dumps(v, sort_keys=True) if isinstance(v, dict) else repr(v)
    return [f"{k}: stream has {show(recorded.get(k))}, here {show(here.get(k))}"
            for k in bit_facts(recorded) if recorded.get(k) != here.get(k)]


def require_device(recorded: dict, error: type = KernelError) -> None:
    """A stream from a GPU cannot be replayed without one, mismatches allowed or not."""
    if recorded.get("device") == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise error(f"this stream was written on a GPU ({recorded.get('gpu', 'unknown model')}); decoding replays "
                        "its training on the same GPU model, and torch sees no CUDA device here")


def check(recorded: dict, kernels: str, accelerator: str, allow_mismatch: bool, error: type = KernelError) -> list[str]:
    """Refuse to decode where the bits would differ (unless allowed); returns the differences."""
    require_device(recorded, error)
    diffs = differences(recorded, facts(kernels, accelerator))
    if diffs and not allow_mismatch:
        advice = ("Portable mode (trainer.kernels: portable) writes streams that verify on any x86-64 CPU with AVX2"
                  if recorded.get("kernels", "native") != "portable" else
                  "Match it (e.g. --threads N, or the pinned package versions)")
        raise error("environment mismatch, training would not replay bitwise: " + "; ".join(diffs)
                    + f". {advice}; or pass --allow-env-mismatch to try anyway (the stream's checksums catch drift)")
    return diffs
