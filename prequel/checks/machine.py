"""What a stream header records about the machine its bits were computed on, and the check that
refuses to decode where they would differ (training/environment.py pins the kernels: that part is f).

The check decides whether Bob decodes, not what he decodes, so it is here, outside f.
"""

import json
import platform
from importlib.metadata import version

from prequel.training.environment import KernelError, device_of, kernel_env

# Facts that change the bits of training, by mode; the rest of `facts()` is informational.
BIT_FACTS = (
    "torch",
    "lightning",
    "numpy",
    "machine",
    "num_threads",
    "device",
    "kernels",
    "cpu_capability",
    "kernel_env",
    "mkl",
    "onednn",
)
NATIVE_BIT_FACTS = ("cpu_model",)  # native kernels may depend on the exact CPU
PORTABLE_BIT_FACTS = ("products",)  # the fixed-order GEMM, or (where it cannot be built) MKL's
GPU_BIT_FACTS = ("gpu",)


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


def facts(kernels: str, accelerator: str) -> dict:
    """Everything recorded in a stream header about where its bits were computed."""
    import lightning
    import torch

    device = device_of(accelerator)
    out = {
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "numba": version("numba"),  # (the coder's integer kernels: exact, so not a bit fact)
        "numpy": version("numpy"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "libc": " ".join(platform.libc_ver()) or "unknown",
        "num_threads": torch.get_num_threads(),
        "device": device,
        "kernels": kernels,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_model": cpu_model(),
        "kernel_env": kernel_env(),
        **_library_versions(),
    }
    if kernels == "portable":
        from prequel.training.environment import portable_products

        out["products"] = portable_products()
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
    return out


def bit_facts(recorded: dict) -> tuple[str, ...]:
    keys = BIT_FACTS
    if recorded.get("kernels", "native") != "portable":
        keys += NATIVE_BIT_FACTS
    else:
        keys += PORTABLE_BIT_FACTS
    if recorded.get("device") == "cuda":
        keys += GPU_BIT_FACTS
    return keys


def differences(recorded: dict, here: dict) -> list[str]:
    """Each bit fact that differs, as 'key: stream has X, here Y'."""

    def show(v):
        return json.dumps(v, sort_keys=True) if isinstance(v, dict) else repr(v)

    return [
        f"{k}: stream has {show(recorded.get(k))}, here {show(here.get(k))}"
        for k in bit_facts(recorded)
        if recorded.get(k) != here.get(k)
    ]


def require_device(recorded: dict, error: type = KernelError) -> None:
    """A stream from a GPU cannot be replayed without one, mismatches allowed or not."""
    if recorded.get("device") == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise error(
                f"this stream was written on a GPU ({recorded.get('gpu', 'unknown model')}); decoding replays "
                "its training on the same GPU model, and torch sees no CUDA device here"
            )


def check(recorded: dict, kernels: str, accelerator: str, allow_mismatch: bool, error: type = KernelError) -> list[str]:
    """Refuse to decode where the bits would differ (unless allowed); returns the differences."""
    require_device(recorded, error)
    diffs = differences(recorded, facts(kernels, accelerator))
    if diffs and not allow_mismatch:
        advice = (
            "Portable mode (trainer.kernels: portable) writes streams that verify on any x86-64 CPU with AVX2"
            if recorded.get("kernels", "native") != "portable"
            else "Match it (e.g. --threads N, or the pinned package versions)"
        )
        raise error(
            "environment mismatch, training would not replay bitwise: "
            + "; ".join(diffs)
            + f". {advice}; or pass --allow-env-mismatch to try anyway (the stream's checksums catch drift)"
        )
    return diffs
