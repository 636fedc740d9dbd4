"""Matrix products whose bits are the same on every x86-64 CPU: portable mode's GEMM (issue 31).

Each output element is one chain of fused multiply-adds in a fixed order, c = fma(a[i, k], b[k, j], c)
for k = 0, 1, ..., K - 1 from c = +0: never split into partial sums, never reassociated. `llvm.fma`
rounds once on every target (in hardware with FMA, in libm's exact fmaf without), and the kernel
vectorises only across output columns j, where lanes are independent chains, so any vector width
(AVX-512, AVX2, SSE2) and any thread count give the same bits. MKL gives no such promise across
vendors except on its slow SSE2 path (``MKL_CBWR=COMPATIBLE``); this kernel runs at MKL's speed
(bench/gemm_speed.py).

Speed: a microkernel in LLVM IR (`_define_ukernel`) keeps an MR × NR tile of accumulators, MR values
of type <NR x float>, in registers for the whole k loop; each step loads an NR-wide row of a packed B
panel, broadcasts MR scalars of A and issues MR vector FMAs. LLVM legalises <32 x float> to what the
target has (2 zmm on AVX-512, 4 ymm on AVX2, 8 xmm and fmaf calls on SSE2): only speed changes.
Tiling, packing (copies) and threading (each element computed by one thread) change no bits either.

numba compiles it for the host CPU (cached per CPU). training/environment.py routes torch's float32
products on the CPU here in portable mode (its `FIXED_PRODUCTS`).
"""

import functools

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

MR, NR, UNROLL = 12, 32, 2  # the register tile (MR rows × NR columns) and the k-loop unroll of the microkernel


def _define_ukernel(module: ir.Module, packed: bool) -> ir.Function:
    """void ukernel(i64 k, float* a, i64 sr, i64 sk, float* b, float* c, i64 ldc), defined once per module.

    c[r * ldc + j] = the chain over kk < k of fma(a[r * sr + kk * sk], b[kk * NR + j], .) from +0, for
    r < MR, j < NR. `b` is a packed panel (NR contiguous floats per k); `packed` fixes sr = 1, sk = MR.
    """
    name = f"fixed_gemm_ukernel_{MR}x{NR}{'_packed' if packed else ''}"
    if name in module.globals:
        return module.globals[name]
    f32, i32, i64, fp = ir.FloatType(), ir.IntType(32), ir.IntType(64), ir.FloatType().as_pointer()
    vec, fma_name = ir.VectorType(f32, NR), f"llvm.fma.v{NR}f32"
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [i64, fp, i64, i64, fp, fp, i64]), name)
    fn.linkage = "internal"
    k, a, sr, sk, b, c, ldc = fn.args
    fma = module.globals.get(fma_name) or ir.Function(module, ir.FunctionType(vec, [vec] * 3), fma_name)
    entry, loop, mid, tail, done = (fn.append_basic_block(x) for x in ("entry", "loop", "mid", "tail", "done"))
    bld, zero, undef = ir.IRBuilder(entry), ir.Constant(vec, None), ir.Constant(vec, ir.Undefined)
    splat_mask = ir.Constant(ir.VectorType(i32, NR), None)

    const = functools.partial(ir.Constant, i64)
    if packed:
        sr, sk = const(1), const(MR)
    offsets = [bld.mul(sr, const(r)) for r in range(MR)]

    def step(kk, accs):  # one k: MR vector FMAs sharing one row of the B panel
        row = bld.gep(b, [bld.mul(kk, const(NR))], inbounds=True)
        bv = bld.load(bld.bitcast(row, vec.as_pointer()), align=4)
        a_k = bld.gep(a, [bld.mul(kk, sk)], inbounds=True)
        new = []
        for r in range(MR):
            s = bld.load(bld.gep(a_k, [offsets[r]], inbounds=True))
            splat = bld.shuffle_vector(bld.insert_element(undef, s, ir.Constant(i32, 0)), undef, splat_mask)
            new.append(bld.call(fma, [splat, bv, accs[r]]))
        return new

    def phis(*incoming):  # one phi per value, each fed from (values, block) pairs
        nodes = [bld.phi(v.type) for v in incoming[0][0]]
        for values, block in incoming:
            for node, v in zip(nodes, values, strict=True):
                node.add_incoming(v, block)
        return nodes

    def close_loop(nodes, values, block, cond, exit_block):
        for node, v in zip(nodes, values, strict=True):
            node.add_incoming(v, block)
        bld.cbranch(cond, block, exit_block)

    # entry -> loop (UNROLL steps at a time) -> mid -> tail (one step at a time) -> done (store)
    k_main = bld.sub(k, bld.srem(k, const(UNROLL)))
    bld.cbranch(bld.icmp_signed(">", k_main, const(0)), loop, mid)
    bld.position_at_end(loop)
    kk, *accs = phis(([const(0)] + [zero] * MR, entry))
    new = accs
    for u in range(UNROLL):
        new = step(bld.add(kk, const(u)), new)
    kk_next = bld.add(kk, const(UNROLL))
    close_loop([kk, *accs], [kk_next, *new], loop, bld.icmp_signed("<", kk_next, k_main), mid)
    bld.position_at_end(mid)
    k_rest, *accs_mid = phis(([const(0)] + [zero] * MR, entry), ([kk_next, *new], loop))
    bld.cbranch(bld.icmp_signed("<", k_rest, k), tail, done)
    bld.position_at_end(tail)
    kk, *accs = phis(([k_rest, *accs_mid], mid))
    new = step(kk, accs)
    kk_next = bld.add(kk, const(1))
    close_loop([kk, *accs], [kk_next, *new], tail, bld.icmp_signed("<", kk_next, k), done)
    bld.position_at_end(done)
    for r, acc in enumerate(phis((accs_mid, mid), (new, tail))):
        bld.store(acc, bld.bitcast(bld.gep(c, [bld.mul(ldc, const(r))], inbounds=True), vec.as_pointer()), align=4)
    bld.ret_void()
    return fn


def _pointer(context, builder, ty, array, offset, vector_width=0):
    """A float* (or <vector_width x float>*) to element `offset` of a numba array value."""
    ptr = builder.gep(context.make_array(ty)(context, builder, array).data, [offset])
    return builder.bitcast(ptr, ir.VectorType(ir.FloatType(), vector_width).as_pointer()) if vector_width else ptr


def _make_ukernel(packed: bool):
    """The microkernel as a numba intrinsic taking (k, a, a_off, sr, sk, b, b_off, c, c_off, ldc): arrays
    with element offsets to their tiles (sr, sk ignored when packed); every integer an int64."""

    @intrinsic
    def ukernel(typingctx, k, a, a_off, sr, sk, b, b_off, c, c_off, ldc):
        def codegen(context, builder, sig, args):
            a_ptr, b_ptr, c_ptr = (_pointer(context, builder, sig.args[i], args[i], args[i + 1]) for i in (1, 5, 7))
            fn = _define_ukernel(builder.module, packed)
            builder.call(fn, [args[0], a_ptr, args[3], args[4], b_ptr, c_ptr, args[9]])
            return context.get_dummy_value()

        return types.void(k, a, a_off, sr, sk, b, b_off, c, c_off, ldc), codegen

    return ukernel


_ukernel, _ukernel_packed = _make_ukernel(False), _make_ukernel(True)


def _make_copy(width: int):
    """An intrinsic (dst, dst_off, src, src_off) copying `width` contiguous floats as one vector (for packing)."""

    @intrinsic
    def copy(typingctx, dst, dst_off, src, src_off):
        def codegen(context, builder, sig, args):
            dst_ptr, src_ptr = (_pointer(context, builder, sig.args[i], args[i], args[i + 1], width) for i in (0, 2))
            builder.store(builder.load(src_ptr, align=4), dst_ptr, align=4)
            return context.get_dummy_value()

        return types.void(dst, dst_off, src, src_off), codegen

    return copy


_copy_mr, _copy_nr = _make_copy(MR), _make_copy(NR)


@intrinsic
def _transpose16(typingctx, dst, dst_off, ldd, src, src_off, lds):
    """dst[r * ldd + c] = src[c * lds + r] for r, c < 16: sixteen vector loads, 64 two-vector shuffles, sixteen
    vector stores (packing a k-contiguous B, such as Wᵀ, without a scalar gather)."""

    def codegen(context, builder, sig, args):
        i32, i64 = ir.IntType(32), ir.IntType(64)

        def row(i, r):  # a pointer to row r of array argument i
            offset = builder.add(args[i + 1], builder.mul(args[i + 2], ir.Constant(i64, r)))
            return _pointer(context, builder, sig.args[i], args[i], offset, 16)

        rows = [builder.load(row(3, c), align=4) for c in range(16)]
        for d in (8, 4, 2, 1):  # swap the off-diagonal d × d blocks of every 2d × 2d block
            for c in (c for c in range(16) if not c & d):
                x, y = rows[c], rows[c + d]
                lo = [lane if not lane & d else 16 + lane - d for lane in range(16)]
                hi = [lane + d if not lane & d else 16 + lane for lane in range(16)]
                mask = [ir.Constant(ir.VectorType(i32, 16), [ir.Constant(i32, v) for v in m]) for m in (lo, hi)]
                rows[c], rows[c + d] = (builder.shuffle_vector(x, y, m) for m in mask)
        for r in range(16):
            builder.store(rows[r], row(0, r), align=4)
        return context.get_dummy_value()

    return types.void(dst, dst_off, ldd, src, src_off, lds), codegen


@intrinsic
def _fma(typingctx, a, b, c):
    """a · b + c rounded once (LLVM's fma intrinsic), for `reference`."""

    def codegen(context, builder, sig, args):
        f32 = ir.FloatType()
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32] * 3), "llvm.fma.f32")
        return builder.call(fma, args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@intrinsic
def _address(typingctx, arr):
    """The address of an array's first element (numba's `ctypes.data` would stop caching)."""

    def codegen(context, builder, sig, args):
        return builder.ptrtoint(context.make_array(sig.args[0])(context, builder, args[0]).data, ir.IntType(64))

    return types.int64(arr), codegen


@numba.njit(nogil=True, inline="always")
def _product(a, b, out, part, parts):  # pragma: no cover (compiled)
    """Part `part` of `parts` of out = a @ b: the parts split the column panels (or, with fewer panels
    than parts, rows too); each packs its own B panels, then walks its row blocks, reusing each A block
    across its panels. Any split computes each element by the same chain."""
    m, k = a.shape
    n = b.shape[1]
    n_blocks, n_panels = (m + MR - 1) // MR, (n + NR - 1) // NR
    if n_blocks == 0 or n_panels == 0:
        return
    sr, sk, sbk, sbj = a.strides[0] // 4, a.strides[1] // 4, b.strides[0] // 4, b.strides[1] // 4
    ldc, k_strided = out.strides[0] // 4, sk != 1
    col_splits = min(parts, n_panels)
    row_splits = max(1, min(parts // col_splits, n_blocks))
    if part >= col_splits * row_splits:
        return
    tc, tr = part % col_splits, part // col_splits
    p0, p1 = n_panels * tc // col_splits, n_panels * (tc + 1) // col_splits
    bp = np.empty((p1 - p0) * k * NR + 16, np.float32)  # B panels, k-major, zero-padded past column n
    b0 = (16 - _address(bp) % 64 // 4) % 16  # aligned to 64 bytes
    for p in range(p0, p1):
        j, base = p * NR, b0 + (p - p0) * k * NR
        cols = min(NR, n - j)
        if cols < NR:
            bp[base : base + k * NR] = 0.0
        if sbj == 1 and cols == NR:
            for kk in range(k):
                _copy_nr(bp, base + kk * NR, b, kk * sbk + j)
        else:
            k16 = k - k % 16 if sbk == 1 and cols == NR else 0
            for kk in range(0, k16, 16):
                for h in range(0, NR, 16):
                    _transpose16(bp, base + kk * NR + h, NR, b, (j + h) * sbj + kk, sbj)
            for kk in range(k16, k):
                for cc in range(cols):
                    bp[base + kk * NR + cc] = b[kk, j + cc]
    ap = np.empty(k * MR, np.float32)  # an A block, k-major, when A is not k-contiguous (or ragged)
    tile = np.empty((MR, NR), np.float32)  # ragged or strided output tiles
    for blk in range(n_blocks * tr // row_splits, n_blocks * (tr + 1) // row_splits):
        i = blk * MR
        rows = min(MR, m - i)
        pack_a = k_strided or rows < MR
        if pack_a and sr == 1 and rows == MR:
            for kk in range(k):
                _copy_mr(ap, kk * MR, a, i + kk * sk)
        elif pack_a:
            for kk in range(k):
                for r in range(MR):
                    ap[kk * MR + r] = a[i + r, kk] if r < rows else np.float32(0.0)
        for p in range(p0, p1):
            j, bo = p * NR, b0 + (p - p0) * k * NR
            cols = min(NR, n - j)
            direct = rows == MR and cols == NR and out.strides[1] == 4
            c, c_off, c_ld = (out, i * ldc + j, ldc) if direct else (tile, 0, NR)
            if pack_a:
                _ukernel_packed(k, ap, 0, 1, MR, bp, bo, c, c_off, c_ld)
            else:
                _ukernel(k, a, i * sr, sr, sk, bp, bo, c, c_off, c_ld)
            if not direct:
                out[i : i + rows, j : j + cols] = tile[:rows, :cols]


@numba.njit("void(float32[:, :], float32[:, :], float32[:, :], int64)", parallel=True, nogil=True, cache=True)
def _gemm(a, b, out, n_threads):  # pragma: no cover (compiled)
    for part in prange(n_threads):
        _product(a, b, out, part, n_threads)


@numba.njit("void(float32[:, :, :], float32[:, :, :], float32[:, :, :], int64)", parallel=True, nogil=True, cache=True)
def _bgemm(a, b, out, n_threads):  # pragma: no cover (compiled)
    """Many products at once (attention's heads): each thread takes whole products, or parts of few."""
    batch = a.shape[0]
    parts = max(1, n_threads // max(batch, 1))
    for job in prange(batch * parts):
        _product(a[job // parts], b[job // parts], out[job // parts], job % parts, parts)


def _check(a: np.ndarray, b: np.ndarray, out: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    *lead, m, k = a.shape
    *lead_b, k2, n = b.shape
    if k != k2 or lead != lead_b or a.dtype != np.float32 or b.dtype != np.float32:
        raise ValueError(
            f"fixed_gemm wants float32 (..., M, K) @ (..., K, N), got {a.dtype}{a.shape} @ {b.dtype}{b.shape}"
        )
    shape = (*lead, m, n)
    out = np.empty(shape, np.float32) if out is None else out
    if out.shape != shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {shape}, got {out.dtype}{out.shape}")
    # Copies (no bit changes) of what the compiled signatures cannot take: odd strides, read-only views.
    a, b = (x if x.flags.writeable and all(s % 4 == 0 and s >= 0 for s in x.strides) else x.copy() for x in (a, b))
    return a, b, out


def gemm(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None, threads: int = 0) -> np.ndarray:
    """out (M, N) = a (M, K) @ b (K, N) in float32, each element one FMA chain in k order.

    a, b and out may have any strides (pass W.T, dy.T, ... as views: packing copies, which changes no
    bits); out must not overlap a or b. Returns out (a new C-contiguous array when not given). `threads`
    (default numba's count) changes no bit: each element is computed by one thread."""
    a, b, out = _check(a, b, out)
    _gemm(a, b, out, threads or numba.get_num_threads())
    return out


def bgemm(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None, threads: int = 0) -> np.ndarray:
    """out (B, M, N) = a (B, M, K) @ b (B, K, N): `gemm` of each of the B pairs."""
    a, b, out = _check(a, b, out)
    _bgemm(a, b, out, threads or numba.get_num_threads())
    return out


@numba.njit(cache=True)
def reference(a, b):  # pragma: no cover (compiled)
    """The definition of the bits: each element's FMA chain, one element at a time (slow)."""
    out = np.empty((a.shape[0], b.shape[1]), np.float32)
    for i in range(a.shape[0]):
        for j in range(b.shape[1]):
            c = np.float32(0.0)
            for kk in range(a.shape[1]):
                c = _fma(a[i, kk], b[kk, j], c)
            out[i, j] = c
    return out
