"""The reference: an exact, obviously-right emulation of the faulty systolic array.

`systolic_matmul` walks the array tile by tile and PE by PE (vectorised over the
batch only) and implements DESIGN.md literally. It is slow on purpose; every fast
path is tested against it bit for bit.
"""

from __future__ import annotations

import torch

from accelerator.faults import ArrayConfig, FaultMap


def wrap_signed(v: torch.Tensor, bits: int) -> torch.Tensor:
    """Reduce int64 `v` to signed `bits`-wide two's complement (wrap-around)."""
    half = 1 << (bits - 1)
    return torch.remainder(v + half, 1 << bits) - half


def stuck_signed(v: torch.Tensor, and_mask: int | torch.Tensor, or_mask: int | torch.Tensor, bits: int) -> torch.Tensor:
    """Stuck-at masks on the raw `bits`-wide two's-complement encoding of int64 `v`.

    Masks come from `FaultMap.dense()` (and = -1 / or = 0 where clean); the
    result is the signed value the faulty register holds.
    """
    return wrap_signed((v & and_mask) | or_mask, bits)


def check_integer_operands(x: torch.Tensor, w: torch.Tensor, array: ArrayConfig) -> None:
    """Raise ValueError naming the problem when x (B, K) / w (O, K) are not valid operands."""
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"operands: x must be (B, K) and w (O, K), got x {tuple(x.shape)} and w {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"operands: K mismatch, x has K={x.shape[1]} but w has K={w.shape[1]}")
    bits = array.number_format.operand_bits
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    for name, t in (("x", x), ("w", w)):
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.all(t == torch.round(t))):
            raise ValueError(f"operands: {name} must hold integers")
        if t.numel() and (int(t.min()) < lo or int(t.max()) > hi):
            raise ValueError(f"operands: {name} out of the {array.fmt} range {lo}..{hi}")


def check_fault_map(array: ArrayConfig, faults: FaultMap) -> None:
    """Raise ValueError when `faults` was made for another array or needs bypass it lacks."""
    if (faults.array.rows, faults.array.cols) != (array.rows, array.cols):
        raise ValueError(
            f"faults: map is for a {faults.array.rows}x{faults.array.cols} array, not {array.rows}x{array.cols}"
        )
    if not array.bypass:
        for f in faults.faults:
            if f.site == "pe":
                raise ValueError(f"faults: dead PE at ({f.row}, {f.col}) but the array has no bypass support")
    for f in faults.faults:
        if f.site != "pe" and (f.bit is None or not 0 <= f.bit < array.bit_width(f.site)):
            raise ValueError(f"faults: bit {f.bit} out of range for site {f.site!r} at ({f.row}, {f.col})")


def systolic_matmul(x: torch.Tensor, w: torch.Tensor, array: ArrayConfig, faults: FaultMap) -> torch.Tensor:
    """Exact result of y = w @ x.T on the faulty weight-stationary array.

    x: (B, K) integer activations, w: (O, K) integer weights, both within the
    operand range of `array.fmt` (int8: -128..127). Returns int64 (B, O): the
    32-bit two's-complement output buffer, y[b, o] = sum over K-tiles of the
    column's bottom psum (the buffer itself is fault-free and wraps at 32 bits).
    """
    check_integer_operands(x, w, array)
    check_fault_map(array, faults)
    R, C = array.rows, array.cols
    op_bits, ps_bits = array.number_format.operand_bits, array.number_format.psum_bits
    x = x.to(torch.int64)
    w = w.to(torch.int64)
    B, K = x.shape
    n_out = w.shape[0]
    d = faults.dense()
    dead = d.dead
    y = torch.zeros(B, n_out, dtype=torch.int64)
    for t in range(-(-K // R)):  # K-tiles
        for u in range(-(-n_out // C)):  # O-tiles
            psum = torch.zeros(B, C, dtype=torch.int64)  # psums start at 0 at the top of every column
            for r in range(R):
                k = t * R + r
                # padding rows past K hold activation 0 and weight 0
                a = x[:, k] if k < K else torch.zeros(B, dtype=torch.int64)
                for c in range(C):
                    o = u * C + c
                    if not dead[r, c]:
                        wv = int(w[o, k]) if (k < K and o < n_out) else 0
                        wv = int(
                            stuck_signed(torch.tensor(wv), int(d.weight_and[r, c]), int(d.weight_or[r, c]), op_bits)
                        )
                        p = wrap_signed(psum[:, c] + a * wv, ps_bits)
                        psum[:, c] = stuck_signed(p, int(d.psum_and[r, c]), int(d.psum_or[r, c]), ps_bits)
                    # the activation register passes right (stuck bits seen by c+1 ..), dead PE or not
                    a = stuck_signed(a, int(d.act_and[r, c]), int(d.act_or[r, c]), op_bits)
            n = min(C, n_out - u * C)
            y[:, u * C : u * C + n] += psum[:, :n]
    return wrap_signed(y, ps_bits)
