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
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

# the torch version of psum_values works on chunks of positions whose float32
# inputs and prefix sums take about this many bytes: on the CPU to stay in cache, on a
# GPU only to bound memory (each chunk costs a dozen kernel launches)
FALLBACK_CHUNK_BYTES = 1 << 24
GPU_CHUNK_BYTES = 1 << 30


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
    cache: dict[object, Any] = field(default_factory=dict, compare=False, repr=False)  # derived from the above


def on_host(t: torch.Tensor) -> bool:
    """Whether `t` is in host (CPU) memory: numba's kernels and the CPU-tuned paths
    apply; otherwise (a GPU) `fast`'s device paths and the torch kernels run. Tests
    patch it to run the device paths on the CPU, where CI can check them."""
    return t.device.type == "cpu"


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
    time (compiled kernel; None: its measured best). All contiguous, on one device:
    on a GPU the torch version runs there."""
    kernels = compiled()
    if kernels is not None and on_host(cols):
        vals: torch.Tensor = kernels.psum_values(cols, steps, term_w, y, aff, const, block)
        return vals
    vals = y[:, aff] + const.view(-1, 1)
    _stuck_psum_bits_torch(cols, steps, term_w, vals)
    return vals


@dataclass(frozen=True)
class _TileRows:
    """The input rows each K-tile's psum steps read, for the torch kernel (from
    PsumSteps alone: built once per plan). rows (T, U) long: tile t's distinct input
    rows (padded by repeating one); slot (T, A, L) long: term_row as indices into them;
    upto (A, S, L) bool: tile row r is in step s's prefix sum."""

    rows: torch.Tensor
    slot: torch.Tensor
    upto: torch.Tensor


def _tile_rows(steps: PsumSteps) -> _TileRows:
    cached = steps.cache.get("tile_rows")
    if cached is None:
        term_row = steps.term_row.cpu()
        T, A, L = term_row.shape
        per_tile = [torch.unique(term_row[t], return_inverse=True) for t in range(T)]
        U = max(len(r) for r, _ in per_tile)
        rows = torch.stack([torch.cat([r, r[:1].expand(U - len(r))]) for r, _ in per_tile])
        slot = torch.stack([i for _, i in per_tile])
        upto = torch.arange(L).view(1, 1, L) <= steps.step_row.cpu().view(A, -1, 1)
        dev = steps.term_row.device
        cached = steps.cache["tile_rows"] = _TileRows(rows.to(dev), slot.to(dev), upto.to(dev))
    assert isinstance(cached, _TileRows)
    return cached


def _stuck_psum_bits_torch(cols: torch.Tensor, steps: PsumSteps, term_w: torch.Tensor, vals: torch.Tensor) -> None:
    """vals (G, A, P) -= the stuck psum bits met, in torch, all tiles at once (no
    host round trips: the GPU's kernel too): one batched float32 GEMM (exact: sums of
    at most L products of 2^14) gives every tile's and step's prefix sum, then the
    bits, step by step."""
    tr = _tile_rows(steps)
    G, P = cols.shape[0], cols.shape[2]
    T, U = tr.rows.shape
    A, S, L = tr.upto.shape
    # w[g, t, a, s, u]: the weight of tile t's input row u in output a's prefix sum at step s
    w = torch.zeros(G, T, A, S, U, device=cols.device)
    terms = (term_w.unsqueeze(3) * tr.upto.view(1, 1, A, S, L)).float()  # (G, T, A, S, L)
    w.scatter_(4, tr.slot.view(1, T, A, 1, L).expand(G, T, A, S, L), terms)
    w = w.view(G * T, A * S, U)
    carry = steps.step_carry.view(1, 1, A, S, 1)
    mask = steps.step_mask.view(1, 1, A, S, 1)
    budget = FALLBACK_CHUNK_BYTES if on_host(cols) else GPU_CHUNK_BYTES
    chunk = max(1, budget // (4 * T * (U + 2 * A * S)))
    for p0 in range(0, P, chunk):
        x = cols[:, tr.rows.view(-1), p0 : p0 + chunk].float().view(G * T, U, -1)
        c = torch.bmm(w, x).to(torch.int32).view(G, T, A, S, -1)
        acc = torch.zeros_like(c[:, :, :, 0])  # (G, T, A, n): bits met so far in each tile
        for s in range(S):
            acc += (c[:, :, :, s] + carry[:, :, :, s] - acc) & mask[:, :, :, s]
        vals[:, :, p0 : p0 + chunk] -= acc.sum(1).to(torch.int32)  # int64 sum, low 32 bits kept
