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

from accelerator.kernels import PsumSteps


@numba.njit(cache=True, boundscheck=False)
def _block_bits(cols, term_row, term_w, step_row, step_mask, step_carry, n_steps, g, p0, n, c, acc, met):
    """met[a, :n] = the stuck bits met by output a at positions p0..p0+n-1 of group g,
    summed over tiles (c, acc: scratch of at least n int32)."""
    T, A = term_row.shape[0], term_row.shape[1]
    met[:, :n] = 0
    for t in range(T):
        for a in range(A):
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


@numba.njit(parallel=True, cache=True, boundscheck=False)
def _stuck_psum_bits(cols, term_row, term_w, step_row, step_mask, step_carry, n_steps, block, n_threads, vals):
    """vals (G, A, P) int32 -= the stuck psum bits met, summed over tiles (mod 2^32);
    cols (G, J, P) int8, term_w (G, T, A, L) int8, the rest the fields of
    `kernels.PsumSteps`. Work comes in blocks of `block` positions of one group; each
    of n_threads threads takes a contiguous range of them.
    """
    G, P, A = cols.shape[0], cols.shape[2], term_row.shape[1]
    n_blocks = (P + block - 1) // block
    n_jobs = G * n_blocks
    n_parts = min(n_threads, n_jobs)
    for part in numba.prange(n_parts):
        c = np.empty(block, np.int32)
        acc = np.empty(block, np.int32)
        met = np.empty((A, block), np.int32)
        for job in range(part * n_jobs // n_parts, (part + 1) * n_jobs // n_parts):
            g, p0 = job // n_blocks, (job % n_blocks) * block
            n = min(block, P - p0)
            _block_bits(cols, term_row, term_w, step_row, step_mask, step_carry, n_steps, g, p0, n, c, acc, met)
            for a in range(A):
                vals[g, a, p0 : p0 + n] -= met[a, :n]


def stuck_psum_bits(cols: torch.Tensor, steps: PsumSteps, term_w: torch.Tensor, vals: torch.Tensor, block: int) -> None:
    """`accelerator.kernels.stuck_psum_bits`, compiled. Runs on as many threads as torch uses."""
    args = (cols, steps.term_row, term_w, steps.step_row, steps.step_mask, steps.step_carry, steps.n_steps)
    with _torch_threads() as n_threads:
        kernel: Any = _stuck_psum_bits  # a numba Dispatcher: its call signature is the Python function's
        kernel(*(t.numpy() for t in args), block, n_threads, vals.numpy())


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
def _dequant_conv(y, vals, slot, scale, bias, scale64, bias64, wo, out):
    """out (N, O, Ho, wo) = y * scale + bias per output channel o = g * Og + j, from the
    array output y (G, Og, N, Ho, Wc) int32 in float32 (exact: |y| < 2^24); channels with
    slot[o] = a >= 0 from vals (G, A, N, Ho, Wc) int32 in float64 (scale64, bias64):
    their wrapped values may be beyond float32's exact integers."""
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
                src64, s64, b64 = vals[g, a, n, h], scale64[o], bias64[o]
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
            scale.double().numpy(),
            bias.double().numpy(),
            wo,
            out.numpy(),
        )
    return out
