"""Portable mode's matrix products (training/fixed_gemm.py): each element one FMA chain in k order,
so the bits are the same at any vector width, on any x86-64 CPU, with any thread count."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from prequel.training import environment, fixed_gemm
from tests.helpers import ROOT

SHAPES = [(37, 129, 77), (1, 1, 1), (513, 7, 33), (12, 0, 32), (25, 3, 65), (130, 257, 100), (64, 128, 384)]


def layouts(rng, m, k, n) -> dict:
    """A Linear layer's three products as views: y = x Wᵀ, dx = dy W, dW = dyᵀ x."""
    x, w, dy = (rng.standard_normal(s, dtype=np.float32) for s in ((m, k), (n, k), (m, n)))
    return {"forward": (x, w.T), "grad input": (dy, w), "grad weight": (dy.T, x)}


def digest() -> str:
    """The bytes of every layout's product at SHAPES, and of a batched one, in hex."""
    import hashlib

    rng, h = np.random.default_rng(0), hashlib.sha256()
    for m, k, n in SHAPES:
        for a, b in layouts(rng, m, k, n).values():
            h.update(fixed_gemm.gemm(a, b).tobytes())
    q, kt = rng.standard_normal((2, 32, 64, 32), dtype=np.float32)
    h.update(fixed_gemm.bgemm(q, kt.transpose(0, 2, 1)).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("m, k, n", SHAPES)
def test_every_layout_is_the_fma_chain_bit_for_bit_and_within_rounding_of_float64(m, k, n):
    for name, (a, b) in layouts(np.random.default_rng(1), m, k, n).items():
        got, exact = fixed_gemm.gemm(a, b), a.astype(np.float64) @ b.astype(np.float64)
        assert np.array_equal(got.view(np.uint32), fixed_gemm.reference(a, b).view(np.uint32)), name
        bound = 2 * max(k, 1) * np.finfo(np.float32).eps * (np.abs(a).astype(np.float64) @ np.abs(b))
        assert np.all(np.abs(got - exact) <= bound), name


def test_thread_counts_and_batching_change_no_bit():
    """Threads split column panels, and rows too where there are fewer panels than threads (n <= 32)."""
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((61, 19), dtype=np.float32), rng.standard_normal((19, 30), dtype=np.float32)
    one = fixed_gemm.reference(a, b)
    assert all(np.array_equal(fixed_gemm.gemm(a, b, threads=t), one) for t in range(1, 10))
    readonly = np.broadcast_to(a[:1], (61, 19))  # a read-only, zero-stride view: copied, the same bits
    assert np.array_equal(fixed_gemm.gemm(readonly, b), fixed_gemm.reference(np.ascontiguousarray(readonly), b))
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((3, 70, 45), dtype=np.float32), rng.standard_normal((3, 45, 100), dtype=np.float32)
    one = [fixed_gemm.gemm(a[i], b[i], threads=1) for i in range(3)]
    assert all(np.array_equal(fixed_gemm.gemm(a[i], b[i], threads=3), one[i]) for i in range(3))
    assert np.array_equal(fixed_gemm.bgemm(a, b, threads=2), np.stack(one))
    assert np.array_equal(fixed_gemm.bgemm(a, b, threads=7), np.stack(one))


def test_the_same_bits_compiled_for_sse2_avx2_and_this_cpu(tmp_path):
    """numba compiles the kernel afresh for each target, in its own process and empty cache: x86-64
    (SSE2, fmaf calls, 4-float vectors), haswell (AVX2 + FMA, 8 floats) and the host (16 on AVX-512)."""
    code = "from tests.test_fixed_gemm import digest; print(digest())"
    digests = {}
    for cpu in ("x86-64", "haswell", "host"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU")}
        if cpu != "host":  # numba adds the host's features to NUMBA_CPU_NAME's unless NUMBA_CPU_FEATURES is set
            env |= {"NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": ""}
        env["NUMBA_CACHE_DIR"] = str(tmp_path / cpu)
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        digests[cpu] = r.stdout.strip()
    assert len(set(digests.values())) == 1, digests


def test_torch_products_in_portable_mode_are_the_kernels():
    """Every float32 product op of CPU tensors (strided views, as autograd passes them; out= and in-place
    forms) gives the kernel's bits; the others are refused; a native run in the same process gets
    torch's own kernels back."""
    from prequel.training.kernels import ensure_kernels

    g = torch.Generator().manual_seed(0)
    x, w, bias = torch.randn(50, 40, generator=g), torch.randn(30, 40, generator=g), torch.randn(30, generator=g)
    q, k = torch.randn(4, 9, 16, generator=g), torch.randn(4, 11, 16, generator=g)
    c = torch.randn(4, 9, 11, generator=g)
    products = torch.from_numpy(np.stack([fixed_gemm.reference(q[i].numpy(), k[i].numpy().T) for i in range(4)]))
    environment.use_fixed_products(True)
    try:
        expected = torch.from_numpy(fixed_gemm.reference(x.numpy(), w.numpy().T))
        assert torch.equal(x @ w.T, expected) and torch.equal(torch.mm(x, w.T, out=torch.empty(0)), expected)
        assert torch.equal(torch.nn.functional.linear(x, w, bias), expected + bias)
        assert torch.equal(torch.zeros(50, 30).addmm_(x, w.T, beta=0), expected)
        assert torch.equal(x @ w[0], expected[:, 0]) and torch.equal(x[0] @ w[0], expected[0, 0])  # mv, dot
        assert torch.equal(q @ k.transpose(1, 2), products)
        assert torch.equal(torch.baddbmm(c, q, k.transpose(1, 2), beta=2, alpha=0.5), (products * 0.5).add(c, alpha=2))
        nan = torch.full_like(c, float("nan"))
        assert torch.equal(torch.baddbmm(nan, q, k.transpose(1, 2), beta=0), products)  # beta 0: c is not read
        assert torch.equal(c.clone().baddbmm_(q, k.transpose(1, 2)), products + c)
        with pytest.raises(environment.KernelError, match="float32 products only"):
            x.double() @ w.double().T
        with pytest.raises(environment.KernelError, match="no fixed-order aten.addr"):
            torch.addr(torch.zeros(3, 3), torch.ones(3), torch.ones(3))
    finally:
        ensure_kernels("native")
    assert environment._products is None and torch.backends.cuda.flash_sdp_enabled()
    assert torch.allclose(x.double() @ w.double().T, expected.double(), atol=1e-4)


def test_where_the_kernel_cannot_be_built_portable_products_fall_back_and_say_so(monkeypatch, capsys):
    from prequel.checks.machine import facts
    from prequel.training.kernels import ensure_kernels

    ensure_kernels("native")
    monkeypatch.setitem(sys.modules, "prequel.training.fixed_gemm", None)  # its import now fails
    monkeypatch.delattr(sys.modules["prequel.training"], "fixed_gemm")
    environment._fixed_gemm.cache_clear()
    environment.use_fixed_products(True)
    assert environment._products is None and torch.backends.cuda.flash_sdp_enabled()
    assert "fixed-order GEMM cannot be built here (ModuleNotFoundError" in capsys.readouterr().err
    assert facts("portable", "cpu")["products"] == "mkl-compatible"
    monkeypatch.undo()
    environment._fixed_gemm.cache_clear()
    assert facts("portable", "cpu")["products"] == "fixed-order" and "products" not in facts("native", "cpu")
