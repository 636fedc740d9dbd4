"""Portable mode's GEMM (training/fixed_gemm.py) against MKL, and its bits on other CPU targets (issue 31).

Each output element is one FMA chain in k order, vectorised only across output columns, so any
vector width gives the same bits (the kernel's docstring says how it is fast).

    python bench/gemm_speed.py                 # GFLOP/s at small.yaml's shapes, three layouts, vs torch (MKL)
    python bench/gemm_speed.py --check         # exactness: vs float64, and bit for bit vs the scalar FMA chain
    python bench/gemm_speed.py --targets       # the same digest compiled for x86-64 (SSE2), haswell, host
"""

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for a checkout without install

from prequel.training.fixed_gemm import _gemm, gemm, reference  # noqa: E402

# small.yaml's Linear layers at batch 8 × 64 = 512 rows: qkv, proj, MLP up and down, head
SHAPES = [(512, 128, 384), (512, 128, 128), (512, 128, 512), (512, 512, 128), (512, 128, 256)]
ODD = [(37, 129, 77), (1, 1, 1), (513, 7, 33), (12, 0, 32), (25, 3, 65), (130, 257, 100), (100, 20, 30)]


def layouts(x: np.ndarray, w: np.ndarray, dy: np.ndarray) -> dict:
    """A Linear layer's three products as (a, b) views: y = x Wᵀ, dx = dy W, dW = dyᵀ x."""
    return {"forward": (x, w.T), "grad input": (dy, w), "grad weight": (dy.T, x)}


def operands(rng: np.random.Generator, m: int, k: int, n: int) -> tuple:
    """x (m, k), W (n, k), dy (m, n): standard normal float32."""
    return tuple(rng.standard_normal(s, dtype=np.float32) for s in ((m, k), (n, k), (m, n)))


def digest() -> str:
    """sha256 of the products, all three layouts, at SHAPES and ODD, of fixed random inputs."""
    rng, h = np.random.default_rng(0), hashlib.sha256()
    for m, k, n in [*SHAPES, *ODD]:
        for a, b in layouts(*operands(rng, m, k, n)).values():
            h.update(gemm(a, b).tobytes())
    return h.hexdigest()


def check() -> None:
    """Every layout at ODD and SHAPES: within float32 rounding of float64, and bit for bit the scalar chain."""
    rng = np.random.default_rng(1)
    for m, k, n in [*ODD, *SHAPES]:
        for name, (a, b) in layouts(*operands(rng, m, k, n)).items():
            got, exact = gemm(a, b), a.astype(np.float64) @ b.astype(np.float64)
            bound = 2 * a.shape[1] * np.finfo(np.float32).eps * (np.abs(a).astype(np.float64) @ np.abs(b))
            assert np.all(np.abs(got - exact) <= bound), (name, m, k, n)
            assert np.array_equal(got.view(np.uint32), reference(a, b).view(np.uint32)), (name, m, k, n)
    out = np.full((40, 70), np.nan, np.float32)[::-1, ::2]  # negative and non-unit output strides
    a, b = rng.standard_normal((40, 9), dtype=np.float32), rng.standard_normal((35, 9), dtype=np.float32).T
    assert np.array_equal(gemm(a, b, out), reference(a, b))
    print(f"exact: {len(ODD) + len(SHAPES)} shapes × 3 layouts, strided out: bit for bit the scalar FMA chain")


def best_seconds(fns, rounds: int = 100) -> list[float]:
    """The best time of one call of each fn, calls interleaved (robust to other work on the machine)."""
    best = [float("inf")] * len(fns)
    for _ in range(rounds + 1):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def speed(threads: int) -> None:
    """GFLOP/s of gemm and torch.mm (MKL), same thread count, on each layout at SHAPES."""
    import torch

    torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    print(f"{threads} threads; each number the best of 100 calls, gemm and torch.mm interleaved")
    print(f"{'layout':>12} {'M × K × N':>15} {'fixed':>9} {'MKL':>9} {'ratio':>6}")
    rng = np.random.default_rng(0)
    for m, k, n in SHAPES:
        for name, (a, b) in layouts(*operands(rng, m, k, n)).items():
            out, ta, tb = np.empty((a.shape[0], b.shape[1]), np.float32), torch.from_numpy(a), torch.from_numpy(b)
            flop = 2 * a.shape[0] * a.shape[1] * b.shape[1]
            fns = [lambda: _gemm(a, b, out, threads), lambda: torch.mm(ta, tb)]  # noqa: B023
            rates = [flop / t / 1e9 for t in best_seconds(fns)]
            dims = f"{a.shape[0]}×{a.shape[1]}×{b.shape[1]}"
            print(f"{name:>12} {dims:>15} {rates[0]:>6.1f} GF {rates[1]:>6.1f} GF {rates[0] / rates[1]:>6.2f}")


def targets() -> None:
    """The digest compiled for three CPUs, each in a fresh process with an empty numba cache: x86-64 is SSE2 with
    fmaf calls, haswell AVX2 + FMA on ymm, host here AVX-512 on zmm."""
    results = {}
    for cpu in ("x86-64", "haswell", "host"):
        env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES")}
        if cpu != "host":  # numba adds the host's features to NUMBA_CPU_NAME's unless NUMBA_CPU_FEATURES is set
            env |= {"NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": ""}
        with tempfile.TemporaryDirectory() as cache:  # compile afresh, not from numba's cache
            cmd = [sys.executable, __file__, "--digest"]
            r = subprocess.run(cmd, env=env | {"NUMBA_CACHE_DIR": cache}, capture_output=True, text=True, check=True)
        results[cpu] = r.stdout.strip()
        print(f"{cpu:>8}: {results[cpu]}")
    print("identical bits on every target:", len(set(results.values())) == 1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", action="store_true", help="compile for several CPUs and compare the bits")
    parser.add_argument("--check", action="store_true", help="compare with float64 and the scalar FMA chain")
    parser.add_argument("--threads", type=int, default=2, help="threads for both gemm and torch (default 2)")
    parser.add_argument("--digest", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.digest:
        print(digest())
    elif args.targets:
        targets()
    elif args.check:
        check()
    else:
        speed(args.threads)
