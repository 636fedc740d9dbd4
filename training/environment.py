"""What in the machine changes the bits of training, and how `portable` mode pins it.

The same program on another CPU can round differently: torch picks ATen kernels by the CPU's
instruction set (AVX-512 or AVX2), oneDNN picks its own, and MKL picks a code path by ISA *and by
vendor*. On an Intel AVX-512 machine `small.yaml` gives a different Σ than on an AMD one or an
AVX2 one, and a stream decodes only where the encoder's kernels run.

``trainer.kernels: portable`` fixes every choice before torch starts:

* ``ATEN_CPU_CAPABILITY=avx2``: ATen's vectorised kernels (softmax, layer norm, GELU, reductions)
  use 8-lane AVX2 code on any x86-64 CPU that has AVX2 (all since 2013 from both vendors).
* ``ONEDNN_MAX_CPU_ISA=AVX2``: the same for oneDNN's JIT kernels.
* Matrix products do not reach MKL at all: `use_fixed_products` routes torch's float32 products on
  the CPU (`FIXED_PRODUCTS`: mm, bmm, addmm, baddbmm, mv, addmv, dot) to training/fixed_gemm.py,
  whose bits are the same at any vector width and as fast as MKL's own, and refuses the other BLAS
  ops; attention on the CPU takes its math path (bmm and softmax), because the
  fused CPU kernel calls MKL from inside. (MKL's one vendor-neutral path, ``MKL_CBWR=COMPATIBLE``,
  is SSE2 and ran small.yaml at a third of native speed; it stays pinned for anything else of MKL's.)
* ``MKL_CBWR=COMPATIBLE``: MKL's one code path that its documentation promises gives the same
  results on Intel and non-Intel CPUs (every other CNR branch is Intel-only).
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

import functools
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
    use_fixed_products(True)


_products = None  # while the fixed products are in use: their torch.library registration, flash's setting before

# The ATen ops whose CPU kernels compute float32 products by BLAS, and what portable mode does with
# each: computes it by training/fixed_gemm.py, or (nothing in f calls it) refuses it, rather than let
# it reach MKL. tests/test_portable.py traces a run with every feature on against this list.
FIXED_PRODUCTS = ("mm", "mm.out", "bmm", "bmm.out", "addmm", "addmm.out", "addmm_", "baddbmm", "baddbmm.out")
FIXED_PRODUCTS += ("baddbmm_", "mv", "addmv", "dot", "vdot")
REFUSED_PRODUCTS = ("mv.out", "addmv.out", "addmv_", "dot.out", "vdot.out", "addbmm", "addbmm.out", "addbmm_")
REFUSED_PRODUCTS += ("addr", "addr.out", "addr_", "_addmm_activation", "_addmm_activation.out")


def use_fixed_products(on: bool) -> None:
    """Portable products on (or, for a native run in the same process, off again): every float32
    product of CPU tensors by training/fixed_gemm.py (`FIXED_PRODUCTS`), and the CPU's attention by
    its math path. Forward, backward and Bob's decoding all reach the products through these ops."""
    global _products
    import torch

    if on == (_products is not None):
        return
    if not on:
        library, flash = _products
        library._destroy()
        _products = None
        torch.backends.cuda.enable_flash_sdp(flash)
        return
    fixed_gemm = _fixed_gemm()
    if fixed_gemm is None:
        return
    flash = torch.backends.cuda.flash_sdp_enabled()
    torch.backends.cuda.enable_flash_sdp(False)  # (despite its name, also the fused CPU attention)
    _products = (_register(fixed_gemm), flash)


def _register(fixed_gemm):
    """CPU kernels (torch.library) for `FIXED_PRODUCTS` and `REFUSED_PRODUCTS`."""
    import warnings

    import torch

    def arrays(*tensors):
        if any(t.dtype != torch.float32 for t in tensors):
            raise KernelError(f"portable kernels compute float32 products only, got {[t.dtype for t in tensors]}")
        return [t.numpy(force=True) for t in tensors]  # views: no copy

    def mm(a, b):
        out = a.new_empty(a.shape[0], b.shape[1])
        fixed_gemm.gemm(*arrays(a, b), out.numpy(), torch.get_num_threads())
        return out

    def bmm(a, b):
        out = a.new_empty(a.shape[0], a.shape[1], b.shape[2])
        fixed_gemm.bgemm(*arrays(a, b), out.numpy(), torch.get_num_threads())
        return out

    def plus(product, c, beta, alpha):  # beta · c + alpha · product, as ATen's addmm defines it (beta 0: c unread)
        product = product if alpha == 1 else product.mul_(alpha)
        return product if beta == 0 else product.add_(c, alpha=beta)

    def with_c(product):  # addmm from mm, baddbmm from bmm, addmv from mv
        return lambda c, a, b, beta=1, alpha=1: plus(product(a, b), c, beta, alpha)

    def out_variant(op):  # the result into `out`, resized as ATen's out= ops do
        def kernel(*args, out, **kwargs):
            result = op(*args, **kwargs)
            return out.resize_(result.shape).copy_(result)

        return kernel

    def in_place(op):
        return lambda c, *args, **kwargs: c.copy_(op(c, *args, **kwargs))

    def refused(name):
        def kernel(*args, **kwargs):
            raise KernelError(f"portable kernels have no fixed-order aten.{name}: it would compute with MKL")

        return kernel

    def mv(a, x):
        return mm(a, x[:, None])[:, 0]

    def dot(x, y):
        return mm(x[None], y[:, None])[0, 0]

    addmm, baddbmm = with_c(mm), with_c(bmm)
    kernels = {"mm": mm, "bmm": bmm, "addmm": addmm, "baddbmm": baddbmm, "mv": mv, "addmv": with_c(mv)}
    kernels |= {"dot": dot, "vdot": dot, "addmm_": in_place(addmm), "baddbmm_": in_place(baddbmm)}
    kernels |= {f"{op}.out": out_variant(kernels[op]) for op in ("mm", "bmm", "addmm", "baddbmm")}
    kernels |= {name: refused(name) for name in REFUSED_PRODUCTS}
    library = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():  # "overriding a previously registered kernel": that is the point
        warnings.simplefilter("ignore")
        for name, kernel in kernels.items():
            library.impl(name, kernel, "CPU")
    return library


@functools.cache
def _fixed_gemm():
    """training/fixed_gemm.py, compiled for this CPU; None (said once, on stderr) where numba cannot
    build it: products then stay MKL's COMPATIBLE path, recorded as such (`portable_products`). Asked
    once a process, so the header's fact and the products a run computes with always agree."""
    try:
        from prequel.training import fixed_gemm
    except Exception as e:  # (numba's compile errors have no common base class but Exception)
        print(
            f"prequel: the fixed-order GEMM cannot be built here ({type(e).__name__}: {e}); portable products fall "
            "back to MKL_CBWR=COMPATIBLE, ~3x slower, and such a stream verifies only where the same fallback is used",
            file=sys.stderr,
        )
        return None
    return fixed_gemm


def portable_products() -> str:
    """What computes a portable run's matrix products here (a bit fact of portable streams)."""
    return "fixed-order" if _fixed_gemm() is not None else "mkl-compatible"
