"""The compiled (numba) versions of `accelerator.kernels`: imported only when numba is
installed; `kernels` says why they exist and falls back to torch without them.

Threads: torch's count (numba's parallel loop, one contiguous range of blocks a
thread; numba's OpenMP layer and torch load the same libgomp, so their threads are
one pool and do not spin against each other). A kernel holds the GIL while it runs,
so calls from several Python threads take turns and numba's threading layer needs no
thread safety of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numba
import numpy as np
import torch
from llvmlite import binding, ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from accelerator.kernels import PsumSteps


def _has_vnni() -> bool:
    """Whether numba compiles for a CPU with AVX-512 VNNI (numba targets the host CPU
    unless NUMBA_CPU_NAME / NUMBA_CPU_FEATURES name a portable one)."""
    if numba.config.CPU_NAME or numba.config.CPU_FEATURES:  # type: ignore[attr-defined]
        return False
    try:
        return bool(binding.get_host_cpu_features().get("avx512vnni", False))
    except RuntimeError:  # llvmlite cannot read this host's features: take the plain kernel
        return False


# psum kernel: VNNI's vpdpbusd where the CPU has it (tests switch it off to check the other)
USE_VNNI = _has_vnni()
# positions a block (a thread's unit of work), measured best on a 2-core EPYC (znver4)
# at 1 and 2 threads: 128..2048 for the plain kernel, 512..4096 for VNNI (its fixed
# cost per output and tile weighs more against its faster multiply-adds)
BLOCK, VNNI_BLOCK = 512, 2048


@numba.njit(cache=True, boundscheck=False)
def _block_bits(cols, term_row, term_w, steps, g, p0, n, a0, a1, c, acc, met):
    """met[a, :n] = the stuck bits met by output a in a0..a1-1 at positions p0..p0+n-1
    of group g, summed over tiles (c, acc: scratch of at least n int32)."""
    step_row, step_mask, step_carry, n_steps = steps
    met[a0:a1, :n] = 0
    for t in range(term_row.shape[0]):
        for a in range(a0, a1):
            c[:n] = 0
            acc[:n] = 0
            r = 0
            for s in range(n_steps[a]):
                end = step_row[a, s] + 1
                while r + 4 <= end:  # four rows a pass over c: fewer loads and stores of c
                    w0, w1 = np.int32(term_w[g, t, a, r]), np.int32(term_w[g, t, a, r + 1])
                    w2, w3 = np.int32(term_w[g, t, a, r + 2]), np.int32(term_w[g, t, a, r + 3])
                    x0, x1 = cols[g, term_row[t, a, r], p0 : p0 + n], cols[g, term_row[t, a, r + 1], p0 : p0 + n]
                    x2, x3 = cols[g, term_row[t, a, r + 2], p0 : p0 + n], cols[g, term_row[t, a, r + 3], p0 : p0 + n]
                    for i in range(n):
                        c[i] += (
                            w0 * np.int32(x0[i]) + w1 * np.int32(x1[i]) + w2 * np.int32(x2[i]) + w3 * np.int32(x3[i])
                        )
                    r += 4
                while r < end:
                    w0 = np.int32(term_w[g, t, a, r])
                    x0 = cols[g, term_row[t, a, r], p0 : p0 + n]
                    for i in range(n):
                        c[i] += w0 * np.int32(x0[i])
                    r += 1
                # int64 arithmetic, stored as int32: the low 32 bits wrap like the register
                mask, carry = step_mask[a, s], step_carry[a, s]
                for i in range(n):
                    acc[i] += (c[i] + carry - acc[i]) & mask
            for i in range(n):
                met[a, i] += acc[i]


@intrinsic
def _dpbusd16(typingctx: Any, c: Any, ci: Any, x: Any, xi: Any, w: Any) -> Any:
    """c[ci : ci + 16] (int32) += per lane i, the dot product of the 4 bytes of
    x[xi + i] (uint32: 4 uint8) with the 4 bytes of w (int32: 4 int8), wrapping mod
    2^32: one AVX-512 VNNI vpdpbusd (64 multiply-adds)."""
    sig = types.void(c, ci, x, xi, w)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        v16 = ir.VectorType(ir.IntType(32), 16)
        ptrs = []
        for arr, idx in ((0, 1), (2, 3)):
            data = context.make_array(signature.args[arr])(context, builder, args[arr]).data
            i = context.cast(builder, args[idx], signature.args[idx], types.intp)
            ptrs.append(builder.bitcast(builder.gep(data, [i]), v16.as_pointer()))
        w32 = context.cast(builder, args[4], signature.args[4], types.int32)
        wv = builder.insert_element(ir.Constant(v16, ir.Undefined), w32, ir.Constant(ir.IntType(32), 0))
        wv = builder.shuffle_vector(wv, ir.Constant(v16, ir.Undefined), ir.Constant(v16, [0] * 16))
        # (v16i32, v16i32, v16i32) is LLVM 14's signature; newer LLVMs upgrade it when parsing
        fnty = ir.FunctionType(v16, [v16] * 3)
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.512")
        acc = builder.load(ptrs[0], align=4)
        builder.store(builder.call(fn, [acc, builder.load(ptrs[1], align=4), wv]), ptrs[0], align=4)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(cache=True, boundscheck=False)
def _quad_slots(term_row, J):
    """The row quads the VNNI kernel interleaves once a block: quad (T, A, Lq), the slot
    of the four input rows that tile t's rows 4q..4q+3 of output a read (-1 where those
    are not rows j..j+3 < J with j % 4 = 0, as at act faults: interleaved on the fly), and
    slot_row (n_slots,), each slot's first input row."""
    T, A, L = term_row.shape
    Lq = (L + 3) // 4
    quad = np.full((T, A, Lq), -1, np.int64)
    slot_of = np.full(term_row.max() // 4 + 1, -1, np.int64)
    n_slots = 0
    for t in range(T):
        for a in range(A):
            for q in range(Lq):
                j0 = term_row[t, a, 4 * q]
                ok = j0 % 4 == 0 and j0 + 3 < J
                for k in range(1, min(4, L - 4 * q)):
                    ok = ok and term_row[t, a, 4 * q + k] == j0 + k
                if ok:
                    if slot_of[j0 // 4] < 0:
                        slot_of[j0 // 4] = n_slots
                        n_slots += 1
                    quad[t, a, q] = slot_of[j0 // 4]
    slot_row = np.empty(n_slots, np.int64)
    for jq in range(slot_of.shape[0]):
        if slot_of[jq] >= 0:
            slot_row[slot_of[jq]] = 4 * jq
    return quad, slot_row


@numba.njit(cache=True, boundscheck=False)
def _interleave(cols, g, j0, j1, j2, j3, p0, n, out):
    """out[i] = the bytes cols[g, j0..j3, p0 + i], each + 128 (as uint8: VNNI's unsigned
    operand)."""
    x0, x1 = cols[g, j0, p0 : p0 + n], cols[g, j1, p0 : p0 + n]
    x2, x3 = cols[g, j2, p0 : p0 + n], cols[g, j3, p0 : p0 + n]
    for i in range(n):
        out[i] = (
            (np.uint32(x0[i]) & 0xFF)
            | (np.uint32(x1[i]) & 0xFF) << 8
            | (np.uint32(x2[i]) & 0xFF) << 16
            | (np.uint32(x3[i]) & 0xFF) << 24
        ) ^ np.uint32(0x80808080)


@numba.njit(cache=True, boundscheck=False)
def _block_bits_vnni(cols, term_row, term_w, quad, slot_row, steps, g, p0, n, a0, a1, xq, c, acc, met):
    """`_block_bits` with VNNI: four rows a vpdpbusd on the inputs + 128 (uint8), whose
    extra 128 * (sum of the weights met) each step takes off its carry. xq (n_slots + 1,
    >= n rounded up to 16) uint32, c, acc: scratch (c as long as an xq row)."""
    step_row, step_mask, step_carry, n_steps = steps
    T, L = term_row.shape[0], term_row.shape[2]
    m = (n + 15) // 16 * 16
    n_slots = slot_row.shape[0]
    for s in range(n_slots):
        j = slot_row[s]
        _interleave(cols, g, j, j + 1, j + 2, j + 3, p0, n, xq[s])
    met[a0:a1, :n] = 0
    for t in range(T):
        for a in range(a0, a1):
            c[:m] = 0
            acc[:n] = 0
            lo, wsum = 0, np.int64(0)
            for s in range(n_steps[a]):
                end = step_row[a, s] + 1
                for q in range(lo // 4, (end + 3) // 4):
                    w = np.int64(0)  # the quad's weights in [lo, end) as 4 bytes, the others 0
                    for k in range(max(lo - 4 * q, 0), min(end - 4 * q, 4)):
                        wk = np.int64(term_w[g, t, a, 4 * q + k])
                        w |= (wk & 0xFF) << (8 * k)
                        wsum += wk
                    x = quad[t, a, q]
                    if x < 0:  # rows past L read row L - 1 (weight 0)
                        x = n_slots
                        j0, j1 = term_row[t, a, min(4 * q, L - 1)], term_row[t, a, min(4 * q + 1, L - 1)]
                        j2, j3 = term_row[t, a, min(4 * q + 2, L - 1)], term_row[t, a, min(4 * q + 3, L - 1)]
                        _interleave(cols, g, j0, j1, j2, j3, p0, n, xq[x])
                    xr = xq[x]
                    for i in range(0, m, 16):
                        _dpbusd16(c, i, xr, i, w)  # type: ignore[call-arg]  # called without typingctx
                lo = end
                mask, carry = step_mask[a, s], np.int64(step_carry[a, s]) - 128 * wsum
                for i in range(n):
                    acc[i] += (c[i] + carry - acc[i]) & mask
            for i in range(n):
                met[a, i] += acc[i]


@numba.njit(cache=True, boundscheck=False)
def _block_bits_plain(cols, term_row, term_w, quad, slot_row, steps, g, p0, n, a0, a1, xq, c, acc, met):
    """`_block_bits` behind `_block_bits_vnni`'s signature (quad, slot_row, xq unused)."""
    _block_bits(cols, term_row, term_w, steps, g, p0, n, a0, a1, c, acc, met)


@numba.njit(parallel=True, cache=True, boundscheck=False)
def _psum_values(cols, term_row, term_w, steps, quad, slot_row, y, aff, const, block, n_threads, block_bits, vals):
    """vals (G, A, P) int32 = y[:, aff] + const less the stuck psum bits met, summed over
    tiles (mod 2^32); cols (G, J, P) int8, term_w (G, T, A, L) int8, y (G, Og, P) int32,
    aff (A,) int64, const (A,) int32, quad and slot_row from `_quad_slots`, the rest the
    fields of `kernels.PsumSteps`; block_bits: `_block_bits_vnni` or `_block_bits_plain`
    (a parameter, so that a CPU without VNNI never compiles the VNNI intrinsic). Work
    comes in blocks of `block` positions of one group, and with fewer blocks than
    threads also in ranges of outputs (a Linear layer's few positions); each of
    n_threads threads takes a contiguous range of them."""
    G, P, A = cols.shape[0], cols.shape[2], vals.shape[1]
    per_g = (P + block - 1) // block
    n_blocks = G * per_g
    a_parts = min(A, max(1, n_threads // n_blocks))
    n_jobs = n_blocks * a_parts
    n_parts = min(n_threads, n_jobs)
    # scratch for the positions a job really has: a Linear layer's few (its batch) in
    # buffers sized for a full block cost more in page faults than in work
    n_max = min(block, P)
    m = (n_max + 15) // 16 * 16
    for part in numba.prange(n_parts):
        xq = np.empty((slot_row.shape[0] + 1, m), np.uint32)
        c = np.empty(m, np.int32)
        acc = np.empty(m, np.int32)
        met = np.empty((A, n_max), np.int32)
        for job in range(part * n_jobs // n_parts, (part + 1) * n_jobs // n_parts):
            b, ap = job // a_parts, job % a_parts
            a0, a1 = ap * A // a_parts, (ap + 1) * A // a_parts
            g, p0 = b // per_g, (b % per_g) * block
            n = min(block, P - p0)
            block_bits(cols, term_row, term_w, quad, slot_row, steps, g, p0, n, a0, a1, xq, c, acc, met)
            for a in range(a0, a1):
                # int64 arithmetic, stored as int32: wraps mod 2^32
                vals[g, a, p0 : p0 + n] = y[g, aff[a], p0 : p0 + n] + const[a] - met[a, :n]


def psum_values(
    cols: torch.Tensor,
    steps: PsumSteps,
    term_w: torch.Tensor,
    y: torch.Tensor,
    aff: torch.Tensor,
    const: torch.Tensor,
    block: int | None,
) -> torch.Tensor:
    """`accelerator.kernels.psum_values`, compiled. Runs on as many threads as torch uses."""
    block = block or (VNNI_BLOCK if USE_VNNI else BLOCK)
    G, A, P = y.shape[0], aff.shape[0], y.shape[2]
    vals = torch.empty(G, A, P, dtype=torch.int32)
    step_fields = tuple(t.numpy() for t in (steps.step_row, steps.step_mask, steps.step_carry, steps.n_steps))
    key = ("quad_slots", cols.shape[1])  # they depend on the plan and the input's rows only
    quad_slots = steps.cache.get(key)
    if quad_slots is None:
        quad_slots = steps.cache[key] = _quad_slots(steps.term_row.numpy(), cols.shape[1])
    with _torch_threads() as n_threads:
        kernel: Any = _psum_values  # a numba Dispatcher: its call signature is the Python function's
        kernel(
            cols.numpy(),
            steps.term_row.numpy(),
            term_w.numpy(),
            step_fields,
            *quad_slots,
            y.numpy(),
            aff.numpy(),
            const.numpy(),
            block,
            n_threads,
            _block_bits_vnni if USE_VNNI else _block_bits_plain,
            vals.numpy(),
        )
    return vals


@contextmanager
def _torch_threads() -> Iterator[int]:
    """Run numba's parallel loops on as many threads as torch uses (yields that count)."""
    torch_threads = torch.get_num_threads()
    n_threads = max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
    numba.set_num_threads(n_threads)
    try:
        yield n_threads
    finally:
        if torch.get_num_threads() != torch_threads:
            # numba's first parallel call sets the thread count of the OpenMP runtime it
            # shares with torch (one libgomp): give torch its own count back
            torch.set_num_threads(torch_threads)


@numba.njit(parallel=True, cache=True, boundscheck=False)
def _dequant_conv(y, vals, slot, scale, bias, wo, out):
    """out (N, O, Ho, wo) = y * scale + bias per output channel o = g * Og + j, from the
    array output y (G, Og, N, Ho, Wc) int32 in float32 (exact: |y| < 2^24); channels with
    slot[o] = a >= 0 from vals (G, A, N, Ho, Wc) int32 in float64 (scale and bias
    widened, exactly): their wrapped values may be beyond float32's exact integers."""
    G, Og, N, Ho = y.shape[0], y.shape[1], y.shape[2], y.shape[3]
    for job in numba.prange(N * G * Og):
        n, o = job // (G * Og), job % (G * Og)
        g, j, a = o // Og, o % Og, slot[o]
        for h in range(Ho):
            dst = out[n, o, h]
            if a < 0:
                src, s, b = y[g, j, n, h], scale[o], bias[o]
                for w in range(wo):
                    dst[w] = np.float32(src[w]) * s + b
            else:
                src64, s64, b64 = vals[g, a, n, h], np.float64(scale[o]), np.float64(bias[o])
                for w in range(wo):
                    dst[w] = np.float64(src64[w]) * s64 + b64


def dequant_conv(
    y: torch.Tensor,
    vals: torch.Tensor,
    slot: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    wo: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Dequantized conv output (N, O, Ho, wo) in `dtype` from the array output y (G, Og,
    N, Ho, Wc) int32 (wide rows: only w < wo are outputs) and the exact values vals (G,
    A, N, Ho, Wc) int32 of the channels o with slot[o] = a >= 0 (slot (O,) int64).
    scale, bias: (O,) float32."""
    G, Og, N, Ho, _ = y.shape
    out = torch.empty(N, G * Og, Ho, wo, dtype=dtype)
    with _torch_threads():
        kernel: Any = _dequant_conv
        kernel(
            y.numpy(),
            vals.numpy(),
            slot.numpy(),
            scale.numpy(),
            bias.numpy(),
            wo,
            out.numpy(),
        )
    return out


@numba.njit(cache=True, boundscheck=False)
def _quantize_int8(w, w_bits, og, w_and, w_or, masked, wq, sw, sw_bits, w8):
    """Int8Symmetric.weight and fast.effective_weight in one pass, the same numbers:
    w (O, K) float32 -> wq (O, K) float32 integer-valued, sw (O,) float32 scales
    (max |w| / 127, 1 for an all-zero row), w8 (O, TR) int8: wq padded with zeros to
    TR, then row o's weight masks w_and, w_or[o % og] (O, TR) applied when `masked`.
    Float32 division and round-half-even, as torch: bit-equal results. Branch-free
    inner loops, so that LLVM vectorizes them; max |w| as the integer maximum of the
    bit patterns without sign bit (w_bits, sw_bits: int32 views of w, sw), which
    orders like the floats and vectorizes where a float max reduction does not."""
    n_out, K, TR = w.shape[0], w.shape[1], w8.shape[1]
    qmax = np.float32(127.0)
    for o in range(n_out):
        row, bits, q_row, w8_row = w[o], w_bits[o], wq[o], w8[o]
        amax_bits = np.int32(0)
        for k in range(K):
            amax_bits = max(amax_bits, bits[k] & np.int32(0x7FFFFFFF))
        sw_bits[o] = amax_bits
        amax = sw[o]
        s = amax / qmax if amax > 0 else np.float32(1.0)
        sw[o] = s
        for k in range(K):
            q_row[k] = min(max(np.rint(row[k] / s), -qmax), qmax)
        if masked:
            and_row, or_row = w_and[o % og], w_or[o % og]
            for k in range(K):
                w8_row[k] = (np.int8(q_row[k]) & and_row[k]) | or_row[k]
            for k in range(K, TR):  # padding rows: weight 0, then the stuck bits
                w8_row[k] = or_row[k]
        else:
            for k in range(K):
                w8_row[k] = np.int8(q_row[k])
            for k in range(K, TR):
                w8_row[k] = 0


@numba.njit(cache=True, boundscheck=False)
def _gather_terms(w8, aff, term_row, out):
    G, T, A, L = out.shape
    for g in range(G):
        for t in range(T):
            for a in range(A):
                src, rows, dst = w8[g, aff[a]], term_row[t, a], out[g, t, a]
                for r in range(L):
                    dst[r] = src[rows[r]]


def gather_terms(w8: torch.Tensor, aff: torch.Tensor, term_row: torch.Tensor) -> torch.Tensor:
    """terms (G, T, A, L) int8: w8[g, aff[a], term_row[t, a, r]] of array weights w8
    (G, Og, J) int8 (an index_select in torch reads a byte a few nanoseconds)."""
    out = torch.empty(w8.shape[0], *term_row.shape, dtype=torch.int8)
    kernel: Any = _gather_terms
    kernel(w8.numpy(), aff.numpy(), term_row.numpy(), out.numpy())
    return out


_NO_MASK = np.zeros((1, 1), dtype=np.int8)


def quantize_int8(
    w: torch.Tensor, og: int, tr: int, w_and: torch.Tensor | None, w_or: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(wq, scale, w8) of float32 weights w (O, ...) for a layer of og outputs a group
    on K-tiles of tr rows: `quant.Int8Symmetric.weight` then `fast.effective_weight`
    (masks (og, tr) int8 or None), in one pass instead of a dozen tensor ops."""
    w2 = w.detach().reshape(w.shape[0], -1).contiguous()
    wq = torch.empty(w.shape, dtype=torch.float32)
    sw = torch.empty(w.shape[0], dtype=torch.float32)
    w8 = torch.empty(w.shape[0], tr, dtype=torch.int8)
    masked = w_and is not None and w_or is not None
    kernel: Any = _quantize_int8
    kernel(
        w2.numpy(),
        w2.view(torch.int32).numpy(),
        og,
        w_and.numpy() if masked else _NO_MASK,  # type: ignore[union-attr]
        w_or.numpy() if masked else _NO_MASK,  # type: ignore[union-attr]
        masked,
        wq.view(w2.shape).numpy(),
        sw.numpy(),
        sw.view(torch.int32).numpy(),
        w8.numpy(),
    )
    return wq, sw, w8
