"""Math whose bits are the same on every x86-64 CPU in portable mode.

Portable mode pins MKL to its vendor-neutral branch (``MKL_CBWR=COMPATIBLE``) so that matrix
products agree across CPUs. But ATen also hands some element-wise functions of float tensors to
MKL's vector math library (VML), and VML's COMPATIBLE branch is neither correctly rounded nor the
same on every CPU: ``torch.sqrt`` of the same 96 floats gave other last bits on this project's
Intel Xeon than on an emulated AMD EPYC-Rome or Intel Haswell (qemu), which changed AdamW's first
step and broke the portable fixture at batch 5 there. `VML_OPS` are the ATen ops whose results
``MKL_CBWR=COMPATIBLE`` changes (measured by ``bench/vml_ops.py``); code that computes bits calls
none of them on the CPU (``tests/test_portable.py`` traces a run with every feature on). The
functions here give the same values through ATen's own vectorised kernels, which the pinned
``ATEN_CPU_CAPABILITY`` makes the same code on every CPU.
"""

import torch

# Measured with bench/vml_ops.py on torch 2.13.0 (MKL 2024.2): these change under MKL_CBWR=COMPATIBLE.
VML_OPS = frozenset(
    {
        "sqrt",
        "exp",
        "log",
        "log2",
        "log10",
        "pow",
        "tan",
        "tanh",
        "asin",
        "acos",
        "atan",
        "erf",
        "erfc",
        "erfinv",
        "logsumexp",
    }
)


def log(x: torch.Tensor) -> torch.Tensor:
    """Natural log (the same values as ``torch.log``, -inf at 0) without VML: xlogy(1, x) = log(x)."""
    return torch.special.xlogy(1.0, x)


def logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """log Σ exp(x) over `dim` without VML: at the row's maximum m, log_softmax(x)_m = x_m − lse."""
    top = x.argmax(dim, keepdim=True)
    return (x.gather(dim, top) - torch.log_softmax(x, dim).gather(dim, top)).squeeze(dim)
