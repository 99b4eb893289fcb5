"""Fast, exact emulation of the faulty array for a lowered layer (y = W x).

Same results as `systolic.systolic_matmul`, bit for bit, at close to GEMM speed:

* dead PEs and weight stuck bits edit the integer weight matrix once per call
  (`effective_weight`), padded to whole K-tiles so padding rows keep their stuck
  weight values;
* an act fault at (r, c) changes the activations of K-indices k = t*R + r only for
  outputs in columns > c: a low-rank correction ``sum_t W[o, tR+r] * delta(x)``,
  chained faults in a row composed into one stuck mask per segment;
* psum faults need, per K-tile, the partial sums of the faulty column up to each
  faulty row (a batched GEMM over tiles, `matmul` with broadcasting); the stuck
  bits are applied in row order on int64 and wrapped at 32 bits; the rest of
  the column sum comes from the clean GEMM (addition commutes with mod 2^32).

Integer-valued tensors are multiplied in float32 when every partial sum stays below
2^24 (exact), otherwise in float64. Layout: a lowered input is (N, G, K, L) with G
conv groups (each a separate matmul on the array) and L output positions per sample;
a Linear layer is N=1, G=1, L=batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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
    act_masks: torch.Tensor  # (4, n_a) int64: and, or after the fault; and, or before it
    act_cols: torch.Tensor  # (Og, n_a) float 1 where the output's column is right of the fault
    aff: torch.Tensor  # (n_aff,) long
    rp: int
    seg_rows: torch.Tensor  # (n_aff, m, rp) float 1 where row r is in psum segment i
    seg_act: torch.Tensor  # (n_aff, m, n_a) float 1 where act fault j lies in segment i and applies
    p_and: torch.Tensor  # (n_aff, m) int64
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
        return int(self.p_and.shape[1])

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
    act_masks = act_masks.reshape(4, n_a).to(torch.int64)
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
        act_cols=act_cols,
        aff=torch.tensor(aff, dtype=torch.long),
        rp=rp,
        seg_rows=seg_rows,
        seg_act=seg_act,
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


RowGetter = Callable[[torch.Tensor, str], torch.Tensor]  # (kidx, cache tag) -> rows


def faulty_product(plan: LayerPlan, weff: torch.Tensor, main: torch.Tensor, rows: RowGetter) -> torch.Tensor:
    """Exact array output from the clean GEMM `main` = weff x (N, G, Og, L).

    `rows(kidx, tag)` returns the integer-valued input rows at padded K-indices kidx
    (shape (M,)) as (N, G, M, L), zero past K. Returns (N, G, Og, L), float32 or
    float64 (whichever holds the exact integers).
    """
    if plan.clean_outputs:
        return main
    R, T, G, Og = plan.R, plan.T, plan.G, plan.Og
    n_a = plan.n_act
    N, L = main.shape[0], main.shape[3]
    y_dtype = exact_dtype(T * R * (1 << 14))
    y = main.to(y_dtype)
    delta = wa = None
    if n_a:
        xi = rows(plan.act_k, "act").reshape(N, G, T, n_a, L).to(torch.int64)
        sh = (1, 1, 1, n_a, 1)
        am = plan.act_masks
        ob = plan.op_bits
        di = stuck_signed(xi, am[0].view(sh), am[1].view(sh), ob) - stuck_signed(xi, am[2].view(sh), am[3].view(sh), ob)
        dt = exact_dtype(T * n_a * (1 << 15))
        delta = di.to(dt)
        wa = weff[:, :, plan.act_k].reshape(G, Og, T, n_a) * plan.act_cols.view(1, Og, 1, n_a).to(weff.dtype)
        corr = torch.matmul(wa.reshape(G, Og, T * n_a).to(dt), delta.reshape(N, G, T * n_a, L))
        y = y + corr.to(y_dtype)
    if plan.n_aff:
        y = y.to(torch.float64)
        y = _psum_faults(plan, weff, y, rows, delta, wa)
    elif T * R * (1 << 14) >= 1 << 31:  # only astronomically large K could overflow the int32 buffer
        y = wrap_signed(y.to(torch.int64), plan.ps_bits).to(torch.float64)
    return y


def _psum_faults(
    plan: LayerPlan,
    weff: torch.Tensor,
    y: torch.Tensor,
    rows: RowGetter,
    delta: torch.Tensor | None,
    wa: torch.Tensor | None,
) -> torch.Tensor:
    """Replace the psum-affected outputs of y (N, G, Og, L, float64) by their faulty values."""
    R, T, G, rp, m = plan.R, plan.T, plan.G, plan.rp, plan.m
    aff, n_aff, n_a = plan.aff, plan.n_aff, plan.n_act
    N, L = y.shape[0], y.shape[3]
    kidx = (torch.arange(T)[:, None] * R + torch.arange(rp)[None, :]).reshape(-1)
    xr = rows(kidx, "psum").reshape(N, G, T, rp, L)
    dt = exact_dtype(rp * (1 << 14) + n_a * (1 << 15))
    # segment weights (G, T, n_aff, m, rp): row r of tile t counts in segment i of output a
    wr = weff.reshape(G, plan.Og, T, R)[:, aff, :, :rp].permute(0, 2, 1, 3).unsqueeze(3)
    parts_w = [wr * plan.seg_rows.to(wr.dtype)]
    parts_x = [xr.to(dt)]
    if n_a:
        assert delta is not None and wa is not None
        wa_aff = wa[:, aff].permute(0, 2, 1, 3).unsqueeze(3)  # (G, T, n_aff, 1, n_a)
        parts_w.append(wa_aff * plan.seg_act.to(wa.dtype))
        parts_x.append(delta.to(dt))
    w_seg = torch.cat(parts_w, dim=-1).reshape(G, T, n_aff * m, -1).to(dt)
    z = torch.cat(parts_x, dim=3)  # (N, G, T, rp + n_a, L)
    s = torch.matmul(w_seg, z).reshape(N, G, T, n_aff, m, L).to(torch.int64)
    p = torch.zeros(N, G, T, n_aff, L, dtype=torch.int64)
    for i in range(m):  # chained psum faults of a column apply in row order
        p = stuck_signed(
            p + s[:, :, :, :, i], plan.p_and[:, i].view(n_aff, 1), plan.p_or[:, i].view(n_aff, 1), plan.ps_bits
        )
    adjust = (p - s.sum(4)).sum(2)  # faulty minus clean prefix sums, over tiles: (N, G, n_aff, L)
    base = y[:, :, aff, :].to(torch.int64)
    y = y.clone()
    y[:, :, aff, :] = wrap_signed(base + adjust, plan.ps_bits).to(y.dtype)
    return y


def linear_rows(x: torch.Tensor) -> RowGetter:
    """Row getter for a Linear input x (B, K): rows(kidx) -> (1, 1, M, B), zero past K."""
    K = x.shape[1]
    xt = F.pad(x.t(), (0, 0, 0, 1))  # extra zero row for padding indices

    def rows(kidx: torch.Tensor, tag: str) -> torch.Tensor:
        return xt[kidx.clamp(max=K)].unsqueeze(0).unsqueeze(0)

    return rows


def linear_product(plan: LayerPlan, xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """Array output for integer-valued x (B, K) and w (O, K): (B, O) float (exact integers)."""
    weff = effective_weight(plan, wq.unsqueeze(0))
    dt = exact_dtype(plan.K * (1 << 14))
    main = F.linear(xq.to(dt), weff[0, :, : plan.K].to(dt))
    if plan.clean_outputs:
        return main
    y = faulty_product(plan, weff, main.t().reshape(1, 1, plan.Og, -1), linear_rows(xq))
    return y[0, 0].t()


def fast_matmul(x: torch.Tensor, w: torch.Tensor, array: ArrayConfig, faults: FaultMap) -> torch.Tensor:
    """Fast path of `systolic_matmul`: same signature, same int64 (B, O) result."""
    check_integer_operands(x, w, array)
    plan = build_plan(array, faults, 1, w.shape[0], w.shape[1])
    return torch.round(linear_product(plan, x.double(), w.double())).to(torch.int64)


def conv_rows(
    plan: LayerPlan,
    xpad: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    out_hw: tuple[int, int],
) -> RowGetter:
    """Row getter for an explicitly padded conv input xpad (N, Cin, Hp, Wp) (im2col rows).

    K-index k of group g is (input channel g*Cin_g + k // (kh*kw), kernel pos); the
    gather indices are cached on the plan per geometry.
    """
    N, Cin, Hp, Wp = xpad.shape
    kh, kw = kernel
    Ho, Wo = out_hw
    G, K = plan.G, plan.K
    cin_g = Cin // G
    src = F.pad(xpad.reshape(N, -1), (0, 1))  # trailing zero: target of padding rows

    def rows(kidx: torch.Tensor, tag: str) -> torch.Tensor:
        key = (tag, kidx.numel(), xpad.shape, kernel, stride, dilation)
        flat = plan.cache.get(key)
        if flat is None:
            kc = kidx.clamp(max=K - 1)
            c_in, i, j = kc // (kh * kw), (kc % (kh * kw)) // kw, kc % kw
            h = i[:, None, None] * dilation[0] + (torch.arange(Ho) * stride[0])[None, :, None]
            w = j[:, None, None] * dilation[1] + (torch.arange(Wo) * stride[1])[None, None, :]
            chan = torch.arange(G)[:, None] * cin_g + c_in[None, :]
            flat = chan[:, :, None, None] * (Hp * Wp) + (h * Wp + w)[None]
            flat = torch.where((kidx < K)[None, :, None, None], flat, Cin * Hp * Wp).reshape(-1)
            plan.cache[key] = flat
        return src[:, flat].reshape(N, G, kidx.numel(), Ho * Wo)

    return rows


def conv_product(
    plan: LayerPlan,
    xpad: torch.Tensor,
    wq: torch.Tensor,
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """Array output of a conv: integer-valued padded input (N, Cin, Hp, Wp), weights
    (O, Cin/G, kh, kw) -> (N, O, Ho, Wo) float (exact integers)."""
    n_out, cin_g, kh, kw = wq.shape
    G = plan.G
    weff = effective_weight(plan, wq.reshape(G, n_out // G, cin_g * kh * kw))
    dt = exact_dtype(plan.K * (1 << 14))
    w4 = weff[:, :, : plan.K].reshape(n_out, cin_g, kh, kw).to(dt)
    main = F.conv2d(xpad.to(dt), w4, None, stride, 0, dilation, G)
    if plan.clean_outputs:
        return main
    N, _, Ho, Wo = main.shape
    rows = conv_rows(plan, xpad, (kh, kw), stride, dilation, (Ho, Wo))
    y = faulty_product(plan, weff, main.reshape(N, G, n_out // G, Ho * Wo), rows)
    return y.reshape(N, n_out, Ho, Wo)
