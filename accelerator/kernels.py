"""Kernels for the parts of the fast path that no library op does well, compiled with
numba when it is installed (`accelerator._compiled`), else in plain torch (same
results, slower): the accelerator itself needs only torch and numpy.

`psum_values`, the exact values of a layer's psum-affected outputs: the clean array
output less the stuck psum bits they meet. Per K-tile, each psum step needs the
prefix sum of its output's column down to the step's row, and then a few bit
operations on it. As library ops that is a skinny GEMM per tile whose result goes to
memory, plus one pass over memory per bit operation (the torch fallback here); the
compiled kernel keeps a block of positions in cache through all tiles, prefix sums
and bit operations of an output and writes only the values. On CPUs with AVX-512 VNNI
its prefix sums take four rows an instruction (vpdpbusd, 64 multiply-adds).

Compiled only, `compiled().dequant_conv`: a conv's (or Linear layer's) int8 array
output and psum values straight to the dequantized float output in one pass
(`fast.ArrayProduct.dequant` does it in torch without numba, rounding the same way).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType

import torch

# the torch fallback of psum_values works on chunks of positions whose float32
# inputs and prefix sums take about this many bytes
FALLBACK_CHUNK_BYTES = 1 << 24


@dataclass(frozen=True)
class PsumSteps:
    """What each psum-affected output a of a layer meets in every K-tile, in row order
    (weight-independent: from the fault map and the layer's shape).

    Its psum meets tile rows 0, 1, ..., tile t's row r read from input row
    term_row[t, a, r] (the clean row, or the stuck row of an act fault left of the
    output). Its step s (of n_steps[a]) comes after tile row step_row[a, s]: the psum
    there is p = c + K - acc (c the prefix sum, K = step_carry[a, s] the stuck values
    set before, acc the bits met before) and the bit met is p & step_mask[a, s]
    (2^b as int32; 0 past n_steps[a], where no bit is met).
    """

    term_row: torch.Tensor  # (T, A, L) long
    step_row: torch.Tensor  # (A, S) long
    step_mask: torch.Tensor  # (A, S) int32
    step_carry: torch.Tensor  # (A, S) int32, mod 2^32
    n_steps: torch.Tensor  # (A,) long


@functools.cache
def compiled() -> ModuleType | None:
    """The numba kernels, or None when numba is not installed (probed once)."""
    try:
        from accelerator import _compiled
    except ImportError:
        return None
    return _compiled


def psum_values(
    cols: torch.Tensor,
    steps: PsumSteps,
    term_w: torch.Tensor,
    y: torch.Tensor,
    aff: torch.Tensor,
    const: torch.Tensor,
    block: int | None = None,
) -> torch.Tensor:
    """The exact values (G, A, P) int32 of the psum-affected outputs aff (A,) long:
    their clean array outputs y[:, aff] (y (G, Og, P) int32) plus const (A,) int32,
    less the stuck psum bits they meet (`steps`), summed over tiles (all mod 2^32).
    cols (G, J, P) int8: the extended lowered input; term_w (G, T, A, L) int8: the
    weight of each row steps.term_row names. `block`: positions a thread takes at a
    time (compiled kernel; None: its measured best). All contiguous CPU tensors."""
    kernels = compiled()
    if kernels is not None:
        vals: torch.Tensor = kernels.psum_values(cols, steps, term_w, y, aff, const, block)
        return vals
    vals = y[:, aff] + const.view(-1, 1)
    _stuck_psum_bits_torch(cols, steps, term_w, vals)
    return vals


def _stuck_psum_bits_torch(cols: torch.Tensor, steps: PsumSteps, term_w: torch.Tensor, vals: torch.Tensor) -> None:
    """vals (G, A, P) -= the stuck psum bits met, in torch: per tile, one float32 GEMM
    (exact: sums of at most L products of 2^14) gives every step's prefix sum; then
    the bits, step by step."""
    term_row, step_row, step_mask, step_carry = steps.term_row, steps.step_row, steps.step_mask, steps.step_carry
    G, P = cols.shape[0], cols.shape[2]
    T, A, L = term_row.shape
    S = step_row.shape[1]
    upto = torch.arange(L).view(1, 1, L) <= step_row.view(A, S, 1)  # (A, S, L): row r in step s's prefix
    for t in range(T):
        rows, idx = torch.unique(term_row[t], return_inverse=True)  # the tile's input rows; (A, L) into them
        w = torch.zeros(G, A, S, len(rows))
        w.scatter_(3, idx.view(1, A, 1, L).expand(G, A, S, L), (term_w[:, t].unsqueeze(2) * upto).float())
        w = w.view(G, A * S, len(rows))
        chunk = max(1, FALLBACK_CHUNK_BYTES // (4 * (A * S + len(rows))))
        for p0 in range(0, P, chunk):
            c = torch.bmm(w, cols[:, rows, p0 : p0 + chunk].float()).to(torch.int32).view(G, A, S, -1)
            acc = torch.zeros_like(c[:, :, 0])  # (G, A, n)
            for s in range(S):
                acc += (c[:, :, s] + step_carry[:, s].view(1, A, 1) - acc) & step_mask[:, s].view(1, A, 1)
            vals[:, :, p0 : p0 + chunk] -= acc
