"""Fast, exact emulation of the faulty array for a lowered layer (y = W x).

Same results as `systolic.systolic_matmul`, bit for bit, at close to GEMM speed:

* dead PEs and weight stuck bits edit the integer weight matrix once per call
  (`effective_weight`), padded to whole K-tiles so padding rows keep their stuck
  weight values;
* an act fault at (r, c) changes the activations of K-indices k = t*R + r only for
  outputs in columns > c: a low-rank correction ``sum_t W[o, tR+r] * delta(x)``
  (two exact int8 GEMMs, on the activations after and before the fault),
  chained faults in a row composed into one stuck mask per segment;
* psum faults need, per K-tile, the partial sums of the faulty column up to each
  faulty row (for convs a float32 conv per tile on the input channels its rows
  read, for Linear int8 GEMMs on the tile rows);
  the stuck bits are applied in row order on int64 and wrapped at 32 bits; the rest of
  the column sum comes from the clean GEMM (addition commutes with mod 2^32).

Integer-valued tensors are multiplied in float32 when every partial sum stays below
2^24 (exact), otherwise in float64. Layout: a lowered input is (N, G, K, L) with G
conv groups (each a separate matmul on the array) and L output positions per sample;
a Linear layer is N=1, G=1, L=batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

import torch
import torch.nn.functional as F

from accelerator.faults import ArrayConfig, FaultMap
from accelerator.systolic import check_fault_map, check_integer_operands, stuck_signed, wrap_signed

EXACT_F32 = 1 << 24  # every integer of magnitude <= 2^24 is exact in float32


def exact_dtype(bound: int) -> torch.dtype:
    """float32 when integer sums bounded by `bound` are exact in it, else float64."""
    return torch.float32 if bound <= EXACT_F32 else torch.float64


@dataclass
class LayerPlan:
    """Everything about a fault map that a lowered layer of shape (G, Og, K) needs.

    Built once per (fault map, layer geometry); weight-independent. Shapes: TR = T*R
    is K padded to whole tiles; n_a act-fault segments; n_aff psum-affected outputs
    (local output indices within a group), m psum faults per affected output (padded
    with identity masks), rp = rows 0..rp-1 needed for the psum prefix sums.
    """

    R: int
    C: int
    T: int
    G: int
    Og: int
    K: int
    op_bits: int
    ps_bits: int
    w_and: torch.Tensor | None  # (Og, TR) int64 stuck masks, None when no weight edits
    w_or: torch.Tensor | None
    keep: torch.Tensor | None  # (Og, TR) bool, False on dead PEs
    act_k: torch.Tensor  # (T * n_a,) padded K-index of each (tile, act fault), tile-major
    act_masks: torch.Tensor  # (4, n_a) int8: and, or after the fault; and, or before it
    act_prev: bool  # some act fault follows another in its row (its "before" mask is not identity)
    act_cols: torch.Tensor  # (Og, n_a) float 1 where the output's column is right of the fault
    aff: torch.Tensor  # (n_aff,) long
    rp: int
    seg_rows: torch.Tensor  # (n_aff, m, rp) float 1 where row r is in psum segment i
    seg_act: torch.Tensor  # (n_aff, m, n_a) float 1 where act fault j lies in segment i and applies
    # psum stuck bits as single-bit steps: step q of segment i of output a forces bit b to s:
    # p += 2^b * (s - bit_b(p)) (no carry; exact mod 2^32); padding steps have weight 0
    p_w: torch.Tensor  # (n_aff, m, nb) float 2^b or 0
    p_scale: torch.Tensor  # (n_aff, m, nb) float 2^-b
    p_s: torch.Tensor  # (n_aff, m, nb) float 0/1
    p_and: torch.Tensor  # (n_aff, m) int64 the same stuck bits as masks (identity for padding)
    p_or: torch.Tensor
    cache: dict[object, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def n_act(self) -> int:
        return int(self.act_masks.shape[1])

    @property
    def n_aff(self) -> int:
        return int(self.aff.numel())

    @property
    def m(self) -> int:
        return int(self.p_w.shape[1])

    @property
    def clean_outputs(self) -> bool:
        """True when the output is just the GEMM with the effective weights."""
        return self.n_act == 0 and self.n_aff == 0


def _act_segments(faults: FaultMap) -> list[tuple[int, int, int, int, int, int]]:
    """Act faults as (row, col, and, or, prev_and, prev_or): the composed stuck mask an
    activation carries right of `col` and the one it carried before (row order)."""
    d = faults.dense()
    out = []
    for r in range(faults.array.rows):
        cur_and, cur_or = -1, 0
        for c in range(faults.array.cols):
            a, o = int(d.act_and[r, c]), int(d.act_or[r, c])
            if a == -1 and o == 0:
                continue
            prev = (cur_and, cur_or)
            # (x & a1 | o1) & a2 | o2 == x & (a1 & a2) | (o1 & a2 | o2)
            cur_and, cur_or = cur_and & a, (cur_or & a) | o
            out.append((r, c, cur_and, cur_or, *prev))
    return out


def build_plan(array: ArrayConfig, faults: FaultMap, groups: int, out_per_group: int, k: int) -> LayerPlan:
    """Precompute the weight-independent structure of `faults` for a (G, Og, K) layer."""
    check_fault_map(array, faults)
    R, C = array.rows, array.cols
    nf = array.number_format
    T = -(-k // R)
    TR = T * R
    d = faults.dense()
    col = torch.arange(out_per_group) % C
    kr = torch.arange(TR) % R
    w_and = w_or = keep = None
    if d.has_weight:
        w_and = torch.from_numpy(d.weight_and)[kr][:, col].T.contiguous()
        w_or = torch.from_numpy(d.weight_or)[kr][:, col].T.contiguous()
        keep = ~torch.from_numpy(d.dead)[kr][:, col].T.contiguous()

    # act faults that reach at least one used column
    acts = [a for a in _act_segments(faults) if a[1] < min(C, out_per_group) - 1]
    n_a = len(acts)
    act_rows = torch.tensor([a[0] for a in acts], dtype=torch.long)
    act_k = (torch.arange(T)[:, None] * R + act_rows[None, :]).reshape(-1)
    act_masks = torch.tensor([[a[2] for a in acts], [a[3] for a in acts], [a[4] for a in acts], [a[5] for a in acts]])
    # int8 two's complement holds the 8-bit masks exactly; stuck bits on int8 need no re-signing
    act_masks = wrap_signed(act_masks.reshape(4, n_a).to(torch.int64), nf.operand_bits).to(torch.int8)
    act_prev = bool(((act_masks[2] != -1) | (act_masks[3] != 0)).any())
    act_cols = (col[:, None] > torch.tensor([a[1] for a in acts], dtype=torch.long)[None, :]).float()

    # psum faults per used column, in row order; a dead PE's psum fault no longer matters
    per_col: dict[int, list[int]] = {}
    for c in range(min(C, out_per_group)):
        rows = [r for r in range(R) if not d.dead[r, c] and (d.psum_and[r, c] != -1 or d.psum_or[r, c] != 0)]
        if rows:
            per_col[c] = rows
    aff = [o for o in range(out_per_group) if int(col[o]) in per_col]
    m = max((len(v) for v in per_col.values()), default=0)
    rp = max((v[-1] + 1 for v in per_col.values()), default=0)
    seg_rows = torch.zeros(len(aff), m, rp)
    seg_act = torch.zeros(len(aff), m, n_a)
    steps = {
        (r, c): [(b, 0) for b in range(nf.psum_bits) if not (int(d.psum_and[r, c]) >> b) & 1]
        + [(b, 1) for b in range(nf.psum_bits) if (int(d.psum_or[r, c]) >> b) & 1]
        for c, rows in per_col.items()
        for r in rows
    }
    nb = max((len(v) for v in steps.values()), default=0)
    p_w = torch.zeros(len(aff), m, nb, dtype=torch.float64)
    p_scale = torch.ones(len(aff), m, nb, dtype=torch.float64)
    p_s = torch.zeros(len(aff), m, nb, dtype=torch.float64)
    p_and = torch.full((len(aff), m), -1, dtype=torch.int64)
    p_or = torch.zeros(len(aff), m, dtype=torch.int64)
    for a_i, o in enumerate(aff):
        c = int(col[o])
        lo = -1
        for i, r in enumerate(per_col[c]):
            seg_rows[a_i, i, lo + 1 : r + 1] = 1.0
            for j, act in enumerate(acts):
                if lo < act[0] <= r and c > act[1]:
                    seg_act[a_i, i, j] = 1.0
            p_and[a_i, i] = int(d.psum_and[r, c])
            p_or[a_i, i] = int(d.psum_or[r, c])
            for q, (b, v) in enumerate(steps[(r, c)]):
                p_w[a_i, i, q], p_scale[a_i, i, q], p_s[a_i, i, q] = 2.0**b, 2.0**-b, float(v)
            lo = r
    return LayerPlan(
        R=R,
        C=C,
        T=T,
        G=groups,
        Og=out_per_group,
        K=k,
        op_bits=nf.operand_bits,
        ps_bits=nf.psum_bits,
        w_and=w_and,
        w_or=w_or,
        keep=keep,
        act_k=act_k,
        act_masks=act_masks,
        act_prev=act_prev,
        act_cols=act_cols,
        aff=torch.tensor(aff, dtype=torch.long),
        rp=rp,
        seg_rows=seg_rows,
        seg_act=seg_act,
        p_w=p_w,
        p_scale=p_scale,
        p_s=p_s,
        p_and=p_and,
        p_or=p_or,
    )


def effective_weight(plan: LayerPlan, wq: torch.Tensor) -> torch.Tensor:
    """The weights the PEs multiply with: (G, Og, K) integer-valued -> (G, Og, TR) float.

    Padded with zero weights to whole K-tiles, then weight stuck bits applied and
    dead PEs zeroed (bypass = fault-aware pruning).
    """
    wp = F.pad(wq, (0, plan.T * plan.R - plan.K))
    if plan.w_and is None:
        return wp
    assert plan.w_or is not None and plan.keep is not None
    wi = stuck_signed(wp.to(torch.int64), plan.w_and, plan.w_or, plan.op_bits)
    return (wi * plan.keep).to(wq.dtype)


class Lowered(Protocol):
    """Access to a lowered integer input without materialising all of it.

    Positions are the last dimension P = N * L (N samples, L output positions per
    sample), so every GEMM below is one batched matmul over groups/tiles with a long
    inner dimension. Gathered rows are positions-first (p = l * N + n: whole rows of the
    samples-last input, no transpose); tile sums are samples-first (p = n * L + l: they
    meet the (N, G, O', L) layer output in runs of L contiguous elements).
    """

    n: int  # samples N
    n_pos: int  # positions per sample L

    def gather_i8(self, kidx: torch.Tensor, tag: str) -> torch.Tensor:
        """int8 rows at padded K-indices kidx (M,): (G, M, P) positions-first, zero past K;
        `tag` names the index set for caching."""
        ...

    def tile_sums(self, w: torch.Tensor) -> torch.Tensor:
        """Per K-tile products with rows 0..rp-1 of the tile: w (G, T, M, rp) integer-valued
        int8-range weights -> (G, T, M, P) int32 samples-first, exact (rows past K read zero)."""
        ...


def _pos_first_to_nglo(t: torch.Tensor, x: Lowered) -> torch.Tensor:
    """(G, O', P) with p = l * N + n -> (N, G, O', L) (a view)."""
    return t.reshape(t.shape[0], t.shape[1], x.n_pos, x.n).permute(3, 0, 1, 2)


def _to_nglo(t: torch.Tensor, x: Lowered) -> torch.Tensor:
    """(G, O', P) with p = n * L + l -> (N, G, O', L) (a view)."""
    return t.reshape(t.shape[0], t.shape[1], x.n, x.n_pos).permute(2, 0, 1, 3)


def faulty_product(
    plan: LayerPlan, weff: torch.Tensor, main: torch.Tensor, x: Lowered
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact array output from the clean GEMM `main` = weff x (N, G, Og, L), which it
    may overwrite.

    Returns (y, patch): y (N, G, Og, L), float32 or float64 (whichever holds the exact
    integers), exact everywhere except at the psum-affected outputs `plan.aff`, whose
    exact values are patch (N, G, n_aff, L) int32 (None without psum faults). Psum
    faults can drive an output anywhere in int32, beyond float32; patching only those
    outputs keeps the rest of the layer in float32.
    """
    if plan.clean_outputs:
        return main, None
    R, T, G, Og = plan.R, plan.T, plan.G, plan.Og
    n_a = plan.n_act
    y = main.to(exact_dtype(T * R * (1 << 14)))
    acts = wa = None
    if n_a:
        acts = _act_operands(plan, x)
        wa = weff[:, :, plan.act_k].reshape(G, Og, T, n_a) * plan.act_cols.view(1, Og, 1, n_a).to(weff.dtype)
        corr = _i8_delta_product(wa.reshape(G, 1, Og, T * n_a), *(a.unsqueeze(1) for a in acts))
        y = y.add_(_pos_first_to_nglo(corr[:, 0], x))  # float32 += int32: exact below 2^24
    if plan.n_aff:
        return y, _psum_patch(plan, weff, y, x, acts, wa)
    if T * R * (1 << 14) >= 1 << 31:  # only astronomically large K could overflow the int32 buffer
        y = _wrap_float(y.to(torch.float64), plan.ps_bits)
    return y, None


def _wrap_float(v: torch.Tensor, bits: int) -> torch.Tensor:
    """wrap_signed for integer-valued float64 (exact below 2^53)."""
    half = float(1 << (bits - 1))
    return torch.remainder(v + half, 2 * half) - half


def _int_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out (int32) = a @ b for int8 matrices: exact integer GEMM, no float conversion."""
    torch._int_mm(a, b, out=out)


def _act_operands(plan: LayerPlan, x: Lowered) -> tuple[torch.Tensor, torch.Tensor]:
    """The activations that act faults change, as int8 (G, T * n_a, P) pairs (after, before):
    the value seen right of each fault and the one seen left of it (its row's earlier
    faults applied), at K-indices plan.act_k. Their difference can exceed int8, so
    products take the two separately (`_i8_delta_product`)."""
    xg = x.gather_i8(plan.act_k, "act")
    am = plan.act_masks.view(4, 1, -1, 1)
    G = xg.shape[0]
    xg4 = xg.view(G, plan.T, plan.n_act, -1)
    after = torch.bitwise_or(torch.bitwise_and(xg4, am[0]), am[1]).view(G, plan.T * plan.n_act, -1)
    before = torch.bitwise_or(torch.bitwise_and(xg4, am[2]), am[3]).view_as(after) if plan.act_prev else xg
    return after, before


def _i8_delta_product(w: torch.Tensor, after: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """w @ (after - before) exactly on int8 GEMMs: w (G, B, M, J) integer-valued in int8
    range, after/before (G, B, J, P) int8 -> (G, B, M, P) int32. Exact while J * 2^14 < 2^31,
    i.e. J < 131072 (J is at most K)."""
    G, B, M, J = w.shape
    w8 = w.to(torch.int8)
    out = torch.empty(G, B, M, after.shape[-1], dtype=torch.int32)
    tmp = torch.empty(M, after.shape[-1], dtype=torch.int32)
    for g in range(G):
        for t in range(B):
            _int_mm(w8[g, t], after[g, t], out[g, t])
            _int_mm(w8[g, t], before[g, t], tmp)
            out[g, t] -= tmp
    return out


def _psum_patch(
    plan: LayerPlan,
    weff: torch.Tensor,
    y: torch.Tensor,
    x: Lowered,
    acts: tuple[torch.Tensor, torch.Tensor] | None,
    wa: torch.Tensor | None,
) -> torch.Tensor:
    """Exact values (N, G, n_aff, L) int32 of the psum-affected outputs, from y (N, G,
    Og, L), exact without the psum faults.

    Per tile, the segment sums S_i (rows after the previous faulty row up to row r_i,
    act corrections included) come from int8 GEMMs on the tile rows (int32, exact);
    outputs meeting one stuck bit then need only bit_b(S) (`_single_step_adjust`),
    chained ones run the psum registers (`_chained_adjust`).
    """
    T, G, rp, m = plan.T, plan.G, plan.rp, plan.m
    aff, n_aff, n_a = plan.aff, plan.n_aff, plan.n_act
    n_pos = x.n * x.n_pos

    def segment_weights(outs: torch.Tensor, m_used: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weights (G, T, n * m_used, rp) of segment i of output aff[outs] on the tile rows
        (row r of tile t counts in segment i), and (G, T, n * m_used, n_a) on the act deltas."""
        n = outs.numel()
        wr = weff.reshape(G, plan.Og, T, plan.R)[:, aff[outs], :, :rp].permute(0, 2, 1, 3).unsqueeze(3)
        w_rows = (wr * plan.seg_rows[outs, :m_used].to(wr.dtype)).reshape(G, T, n * m_used, rp)
        if not n_a:
            return w_rows, None
        assert wa is not None
        wa_o = wa[:, aff[outs]].permute(0, 2, 1, 3).unsqueeze(3)  # (G, T, n, 1, n_a)
        return w_rows, (wa_o * plan.seg_act[outs, :m_used].to(wa.dtype)).reshape(G, T, n * m_used, n_a)

    n_steps = (plan.p_w != 0).sum((1, 2))
    single = torch.nonzero(n_steps == 1).flatten()
    chained = torch.nonzero(n_steps > 1).flatten()
    # one segment per single-step output, m per chained one: all in one pass over the input
    parts = [segment_weights(single, 1), segment_weights(chained, m)]
    s = x.tile_sums(torch.cat([w for w, _ in parts], dim=2))  # (G, T, n1 + n2 * m, P) int32
    if n_a:
        assert acts is not None
        w_act = torch.cat([w for _, w in parts if w is not None], dim=2)
        act = _i8_delta_product(w_act, *(a.reshape(G, T, n_a, -1) for a in acts))  # positions-first
        s.view(*s.shape[:3], x.n, x.n_pos).add_(act.view(*act.shape[:3], x.n_pos, x.n).transpose(3, 4))
    n1 = single.numel()
    if not chained.numel():
        adjust = _single_step_adjust(plan, s, single)
    else:
        adjust = torch.empty(G, n_aff, n_pos, dtype=torch.int64)
        if n1:
            adjust[:, single] = _single_step_adjust(plan, s[:, :, :n1], single)
        adjust[:, chained] = _chained_adjust(plan, s[:, :, n1:].unflatten(2, (chained.numel(), m)), chained)
    v = y[:, :, aff, :].to(torch.int64).add_(_to_nglo(adjust, x))
    # int64 -> int32 keeps the low 32 bits (two's complement): the buffer's wrap-around
    return v.to(torch.int32)


def _single_step_adjust(plan: LayerPlan, s: torch.Tensor, outs: torch.Tensor) -> torch.Tensor:
    """Affected outputs `outs` (indices into plan.aff) meeting one stuck bit b (value v):
    sum over tiles of 2^b (v - bit_b(S)) = 2^b (T v - sum_t bit_b(S)), S (G, T, n, P)
    int32 (the register's two's-complement bits), overwritten. Returns (G, n, P) int64."""
    n = outs.numel()
    b = torch.log2(plan.p_w[outs, 0, 0]).to(torch.int32).view(n, 1)
    v = plan.p_s[outs, 0, 0].to(torch.int64).view(n, 1)
    bits = s.bitwise_right_shift_(b).bitwise_and_(1)
    # counts <= T: an int32 reduction (int64-accumulating ones are many times slower)
    ones = (bits[:, 0] if plan.T == 1 else bits.sum(1, dtype=torch.int32)).to(torch.int64)  # (G, n, P)
    return ones.sub_(plan.T * v).neg_().bitwise_left_shift_(b.to(torch.int64))


def _chained_adjust(plan: LayerPlan, s: torch.Tensor, outs: torch.Tensor) -> torch.Tensor:
    """General case for affected outputs `outs`: segment sums S_i (G, T, n, m, P) int32
    go through the column's psum registers in row order, p = (p + S_i) & and_i | or_i
    on int64 (the low 32 bits are the register; no wrap needed until the buffer).
    Returns sum over tiles of (p_last - sum_i S_i), (G, n, P) int64."""
    n, m = outs.numel(), s.shape[3]
    p = s[:, :, :, 0].to(torch.int64)
    for i in range(m):  # chained psum faults of a column apply in row order
        if i:
            p += s[:, :, :, i]
        p.bitwise_and_(plan.p_and[outs, i].view(n, 1)).bitwise_or_(plan.p_or[outs, i].view(n, 1))
    p -= s.sum(3, dtype=torch.int32)  # one tile's segments add up to |.| < 2^24: int32 is exact
    return _sum_tiles(p)


def _sum_tiles(p: torch.Tensor) -> torch.Tensor:
    """p (G, T, ...) int64 summed over tiles (dim 1) by slice adds: int64 reductions over
    a middle dimension are several times slower than elementwise adds on CPU."""
    out = p[:, 0].clone()
    for t in range(1, p.shape[1]):
        out += p[:, t]
    return out


class LinearInput:
    """`Lowered` view of a Linear input x (B, K): G = 1, N = B, L = 1."""

    def __init__(self, x: torch.Tensor, plan: LayerPlan) -> None:
        self.plan, self.n, self.n_pos = plan, x.shape[0], 1
        pad = plan.T * plan.R - plan.K
        self.xt = F.pad(x.t(), (0, 0, 0, pad))  # (TR, B), zero rows past K

    def gather_i8(self, kidx: torch.Tensor, tag: str) -> torch.Tensor:
        return self.xt[kidx].to(torch.int8).unsqueeze(0)

    def tile_sums(self, w: torch.Tensor) -> torch.Tensor:
        # one batched float32 matmul over tiles (exact: |sums| <= rp * 2^14 < 2^24); a
        # Linear's few samples make per-tile int8 GEMM calls cost more than the math
        p, rp = self.plan, w.shape[-1]
        tiles = self.xt.to(torch.float32).reshape(1, p.T, p.R, -1)[:, :, :rp]
        return torch.matmul(w.to(torch.float32), tiles).to(torch.int32)


@dataclass
class ArrayProduct:
    """A layer's array output (N, O, ...) without widening all of it: `y` holds the exact
    integers everywhere except at output channels `chan` (psum-affected), whose exact
    values are `vals` (N, len(chan), ...) int32."""

    y: torch.Tensor
    chan: torch.Tensor | None = None
    vals: torch.Tensor | None = None

    def exact(self) -> torch.Tensor:
        """The whole exact integer output (float32 or float64)."""
        if self.chan is None:
            return self.y
        assert self.vals is not None
        y = self.y.to(torch.float64)
        y[:, self.chan] = self.vals.to(y.dtype)
        return y

    def dequant(self, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """y * scale (+ bias) per output channel, in `dtype`; patched channels are scaled
        from their exact values in float64."""
        view = (1, -1) + (1,) * (self.y.dim() - 2)
        sc = scale.to(self.y.dtype).view(view)
        if bias is not None:
            out = torch.addcmul(bias.to(self.y.dtype).view(view), self.y, sc)
        else:
            out = self.y.mul_(sc) if self.chan is None else self.y * sc
        out = out.to(dtype)
        if self.chan is not None:
            assert self.vals is not None
            v = self.vals * scale.to(torch.float64)[self.chan].view(view)
            if bias is not None:
                v += bias.to(torch.float64)[self.chan].view(view)
            out[:, self.chan] = v.to(dtype)
        return out


def _parts(plan: LayerPlan, y: torch.Tensor, patch: torch.Tensor | None, shape: tuple[int, ...]) -> ArrayProduct:
    """(N, G, Og, L) output and (N, G, n_aff, L) patch -> ArrayProduct of `shape`."""
    if patch is None:
        return ArrayProduct(y.reshape(shape))
    chan = plan.cache.get("chan")
    if chan is None:
        chan = plan.cache["chan"] = (torch.arange(plan.G)[:, None] * plan.Og + plan.aff[None, :]).reshape(-1)
    return ArrayProduct(y.reshape(shape), chan, patch.reshape((shape[0], chan.numel()) + shape[2:]))


def linear_parts(plan: LayerPlan, xq: torch.Tensor, wq: torch.Tensor) -> ArrayProduct:
    """Array output for integer-valued x (B, K) and w (O, K), (B, O) (see ArrayProduct)."""
    weff = effective_weight(plan, wq.unsqueeze(0))
    dt = exact_dtype(plan.K * (1 << 14))
    main = F.linear(xq.to(dt), weff[0, :, : plan.K].to(dt))
    if plan.clean_outputs:
        return ArrayProduct(main)
    B = xq.shape[0]
    y, patch = faulty_product(plan, weff, main.reshape(B, 1, plan.Og, 1), LinearInput(xq, plan))
    return _parts(plan, y, patch, (B, plan.Og))


def linear_product(plan: LayerPlan, xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """Array output for integer-valued x (B, K) and w (O, K): (B, O) float (exact integers)."""
    return linear_parts(plan, xq, wq).exact()


def fast_matmul(x: torch.Tensor, w: torch.Tensor, array: ArrayConfig, faults: FaultMap) -> torch.Tensor:
    """Fast path of `systolic_matmul`: same signature, same int64 (B, O) result."""
    check_integer_operands(x, w, array)
    plan = build_plan(array, faults, 1, w.shape[0], w.shape[1])
    return torch.round(linear_product(plan, x.double(), w.double())).to(torch.int64)


class ConvInput:
    """`Lowered` view (im2col) of an explicitly padded conv input xpad (N, Cin, Hp, Wp).

    K-index k of group g is (input channel g*Cin_g + k // (kh*kw), kernel position).
    Gathers read whole sample vectors from the input transposed to (Cin*Hp*Wp, N)
    (contiguous rows); the indices are cached on the plan per geometry.
    """

    def __init__(
        self,
        plan: LayerPlan,
        xpad: torch.Tensor,
        kernel: tuple[int, int],
        stride: tuple[int, int],
        dilation: tuple[int, int],
        out_hw: tuple[int, int],
    ) -> None:
        self.plan, self.kernel, self.stride, self.dilation, self.out_hw = plan, kernel, stride, dilation, out_hw
        self.shape = xpad.shape
        self.n, self.n_pos = xpad.shape[0], out_hw[0] * out_hw[1]
        self.xf = xpad.to(torch.float32)

    @cached_property
    def src(self) -> torch.Tensor:
        """(Cin*Hp*Wp + 1, N) int8; the extra zero row is what padding rows (k >= K) read."""
        return F.pad(self.xf.to(torch.int8).reshape(self.n, -1).t(), (0, 0, 0, 1))

    def _index(self, kidx: torch.Tensor, tag: str) -> torch.Tensor:
        N, Cin, Hp, Wp = self.shape
        key = (tag, kidx.numel(), self.shape[1:], self.kernel, self.stride, self.dilation)
        flat = self.plan.cache.get(key)
        if flat is None:
            (kh, kw), (Ho, Wo), K = self.kernel, self.out_hw, self.plan.K
            kc = kidx.clamp(max=K - 1)
            c_in, i, j = kc // (kh * kw), (kc % (kh * kw)) // kw, kc % kw
            h = i[:, None, None] * self.dilation[0] + (torch.arange(Ho) * self.stride[0])[None, :, None]
            w = j[:, None, None] * self.dilation[1] + (torch.arange(Wo) * self.stride[1])[None, None, :]
            chan = torch.arange(self.plan.G)[:, None] * (Cin // self.plan.G) + c_in[None, :]
            flat = chan[:, :, None, None] * (Hp * Wp) + (h * Wp + w)[None]
            flat = torch.where((kidx < K)[None, :, None, None], flat, Cin * Hp * Wp).reshape(-1)
            self.plan.cache[key] = flat
        return flat

    def gather_i8(self, kidx: torch.Tensor, tag: str) -> torch.Tensor:
        out = self.src[self._index(kidx, tag)]  # (G * M * L, N): row gathers
        return out.view(self.plan.G, kidx.numel(), self.n_pos * self.n)

    def tile_sums(self, w: torch.Tensor) -> torch.Tensor:
        p = self.plan
        G, T, M, rp = w.shape
        # per (group, tile) one float32 conv on the input channels the tile's rows read;
        # its kernels are those rows' weights (exact: |partial sums| <= rp * 2^14 < 2^24)
        kh, kw = self.kernel
        khw, cin_g = kh * kw, p.K // (kh * kw)
        out = torch.empty(G, T, M, self.n, self.n_pos, dtype=torch.int32)
        for t in range(T):
            k0, k1 = t * p.R, min(t * p.R + rp, p.K)  # rows past K read zero: skipped
            if k0 >= k1:
                out[:, t] = 0
                continue
            c0, c1 = k0 // khw, (k1 - 1) // khw + 1
            wk = torch.zeros(G, M, (c1 - c0) * khw, dtype=torch.float32)
            wk[:, :, k0 - c0 * khw : k1 - c0 * khw] = w[:, t, :, : k1 - k0]
            for g in range(G):
                xs = self.xf[:, g * cin_g + c0 : g * cin_g + c1]
                o = F.conv2d(xs, wk[g].view(M, c1 - c0, kh, kw), None, self.stride, 0, self.dilation)
                out[g, t].copy_(o.view(self.n, M, self.n_pos).transpose(0, 1))  # int32 + layout, one copy
        return out.view(G, T, M, -1)


def conv_parts(
    plan: LayerPlan,
    xpad: torch.Tensor,
    wq: torch.Tensor,
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> ArrayProduct:
    """Array output of a conv: integer-valued padded input (N, Cin, Hp, Wp), weights
    (O, Cin/G, kh, kw) -> (N, O, Ho, Wo) (see ArrayProduct)."""
    n_out, cin_g, kh, kw = wq.shape
    G = plan.G
    weff = effective_weight(plan, wq.reshape(G, n_out // G, cin_g * kh * kw))
    dt = exact_dtype(plan.K * (1 << 14))
    w4 = weff[:, :, : plan.K].reshape(n_out, cin_g, kh, kw).to(dt)
    main = F.conv2d(xpad.to(dt), w4, None, stride, 0, dilation, G)
    if plan.clean_outputs:
        return ArrayProduct(main)
    N, _, Ho, Wo = main.shape
    x = ConvInput(plan, xpad, (kh, kw), stride, dilation, (Ho, Wo))
    y, patch = faulty_product(plan, weff, main.reshape(N, G, n_out // G, Ho * Wo), x)
    return _parts(plan, y, patch, (N, n_out, Ho, Wo))


def conv_product(
    plan: LayerPlan,
    xpad: torch.Tensor,
    wq: torch.Tensor,
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """Array output of a conv: integer-valued padded input (N, Cin, Hp, Wp), weights
    (O, Cin/G, kh, kw) -> (N, O, Ho, Wo) float (exact integers)."""
    return conv_parts(plan, xpad, wq, stride, dilation).exact()
