"""Fast, exact emulation of the faulty array for a lowered layer (y = W x).

Same results as `systolic.systolic_matmul`, bit for bit, at close to GEMM speed:

* dead PEs and weight stuck bits edit the int8 weight matrix (`effective_weight`),
  padded to whole K-tiles so padding rows keep their stuck weight values; a layer
  prepares its weights once per (plan, weight version) (`array_weights`);
* without act or psum faults the output is one float GEMM (conv) of the input with
  those weights (exact: integer sums below 2^24 in float32, else float64);
* otherwise the layer runs on int8 GEMMs with int32 accumulation (exact) over the
  *extended lowered input* (`linear_cols`, `conv_cols`): the TR lowered rows (K padded
  to whole tiles) followed by one row per (tile, act fault) holding the activation as
  stuck by that fault (its row's earlier faults composed in). An output right of an
  act fault reads that stuck row instead of the clean one (`array_weight`), so act
  faults cost T * n_act extra rows of one GEMM;
* psum faults need, per K-tile, the partial sums of the faulty column up to each
  faulty row (the tile's rows, clean or act-stuck as the output reads them). Setting
  stuck bit b to v adds 2^b (v - bit_b(p)) to the psum p: the bits are met one by one
  in row order in int32, whose wrapping adds and bitwise ops are exactly the array's
  32-bit psum registers, and the rest of the column sum comes from the main GEMM
  (addition commutes with mod 2^32). A kernel (`kernels.psum_values`, compiled
  with numba when installed) does the prefix sums and bit ops of a block of positions
  in cache;
* big temporaries (the lowered input, the padded input) live in per-thread buffers
  reused across calls (`_scratch`): fresh ones cost more in page faults than in work.

On a GPU (inputs on a CUDA device) the same code runs there with the plan's tensors
moved once (`LayerPlan.to`): the GEMMs in float64 (exact; the GPU's int8 GEMM refuses
most of these shapes), clean layers in float64 and rounded (GPU libraries may choose
Winograd or FFT convolutions or TF32 inputs, inexact on integers), and the torch
version of the psum kernel; only the numba kernels are CPU-only.

Layout: an extended lowered input is (G, TR + T * n_act, P) int8 with G conv groups
(each a separate matmul on the array) and P positions, samples first: P = N * Ho * Wc
for a conv (`conv_cols`), P = B for a Linear layer (G = 1).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from accelerator import kernels
from accelerator.faults import ArrayConfig, FaultMap
from accelerator.kernels import PsumSteps
from accelerator.quant import Int8Symmetric, Quantizer
from accelerator.systolic import check_fault_map, check_integer_operands, wrap_signed

EXACT_F32 = 1 << 24  # every integer of magnitude <= 2^24 is exact in float32
# int8 x int8 products are at most 2^14: an int32 GEMM accumulator is exact up to this
# many rows (beyond it the rows are summed in chunks and wrapped like the int32 buffer)
INT32_ROWS = 1 << 16
# the psum kernel works on blocks of this many positions, None: the kernel's own
# (`kernels.psum_values`); tests set a few
PSUM_BLOCK: int | None = None
# lowered inputs up to this size live in a per-thread buffer reused across calls: a
# fresh one of tens of MB costs more in page faults (first touch) than filling it
WORKSPACE_MAX_BYTES = 1 << 28
_workspace = threading.local()


def exact_dtype(bound: int) -> torch.dtype:
    """float32 when integer sums bounded by `bound` are exact in it, else float64."""
    return torch.float32 if bound <= EXACT_F32 else torch.float64


@dataclass
class LayerPlan:
    """Everything about a fault map that a lowered layer of shape (G, Og, K) needs.

    Built once per (fault map, layer geometry); weight-independent. Shapes: TR = T*R
    is K padded to whole tiles; n_a act faults that reach a used column; n_aff
    psum-affected outputs (local output indices within a group); rp = rows 0..rp-1 of a
    tile needed for the psum prefix sums; S = most psum steps of one output.
    """

    R: int
    C: int
    T: int
    G: int
    Og: int
    K: int
    op_bits: int
    ps_bits: int
    # (Og, TR) int8 stuck masks, both 0 on dead PEs (their weight reads 0); None when no
    # weight edits
    w_and: torch.Tensor | None
    w_or: torch.Tensor | None
    act_k: torch.Tensor  # (T * n_a,) padded K-index of each (tile, act fault), tile-major
    act_masks: torch.Tensor  # (2, n_a) int8: and, or an activation carries right of the fault
    row_keep: torch.Tensor  # (Og, TR) bool: False where the output reads an act-stuck row instead
    act_sel: torch.Tensor  # (Og, n_a) bool: fault j is the last one of its row left of the output
    aff: torch.Tensor  # (n_aff,) long
    rp: int
    # A psum fault sets its stuck bits one by one: step j of an affected output sets bit
    # b_j to v_j after tile row r_j (row order; a fault with several bits: several
    # steps). psum: those steps and the input rows each tile row is read from (term_row
    # (T, n_aff, rp)); step_carry K_{j-1} with K_j = sum_{i <= j} v_i 2^b_i.
    psum: PsumSteps
    out_const: torch.Tensor  # (n_aff,) int32 T * K_last mod 2^32
    cache: dict[object, Any] = field(default_factory=dict, repr=False)  # derived tensors, copies on other devices

    @property
    def n_act(self) -> int:
        return int(self.act_masks.shape[1])

    @property
    def n_aff(self) -> int:
        return int(self.aff.numel())

    @property
    def TR(self) -> int:
        return self.T * self.R

    @property
    def rows(self) -> int:
        """Rows of the extended lowered input: TR + T * n_act."""
        return self.T * (self.R + self.n_act)

    @property
    def clean_outputs(self) -> bool:
        """True when the output is just the GEMM with the effective weights."""
        return self.n_act == 0 and self.n_aff == 0

    @property
    def device(self) -> torch.device:
        return self.aff.device

    def to(self, device: torch.device) -> LayerPlan:
        """This plan with its tensors on `device` (itself when already there); the copy
        is cached, so a layer gets the same one on every call."""
        if self.device == device:
            return self
        moved = self.cache.get(("to", device))
        if moved is None:
            tensors: dict[str, Any] = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
            psum = PsumSteps(**{k: v.to(device) for k, v in vars(self.psum).items() if k != "cache"})
            moved = self.cache[("to", device)] = dataclasses.replace(self, **tensors, psum=psum, cache={})
        return moved


def _act_segments(faults: FaultMap) -> list[tuple[int, int, int, int]]:
    """Act faults as (row, col, and, or): the composed stuck mask an activation carries
    right of `col` (its row's faults applied in column order)."""
    d = faults.dense()
    out = []
    for r in range(faults.array.rows):
        cur_and, cur_or = -1, 0
        for c in range(faults.array.cols):
            a, o = int(d.act_and[r, c]), int(d.act_or[r, c])
            if a == -1 and o == 0:
                continue
            # (x & a1 | o1) & a2 | o2 == x & (a1 & a2) | (o1 & a2 | o2)
            cur_and, cur_or = cur_and & a, (cur_or & a) | o
            out.append((r, c, cur_and, cur_or))
    return out


def build_plan(array: ArrayConfig, faults: FaultMap, groups: int, out_per_group: int, k: int) -> LayerPlan:
    """Precompute the weight-independent structure of `faults` for a (G, Og, K) layer."""
    check_fault_map(array, faults)
    R, C = array.rows, array.cols
    nf = array.number_format
    if nf.psum_bits != 32 or nf.operand_bits != 8:  # registers are emulated as int8 / int32 tensors
        raise NotImplementedError(f"number format {nf.name!r}: only int8 operands and 32-bit psums are emulated")
    T = -(-k // R)
    TR = T * R
    d = faults.dense()
    col = torch.arange(out_per_group) % C
    kr = torch.arange(TR) % R
    w_and = w_or = None
    if d.has_weight:
        # int8 two's complement holds the 8-bit masks exactly (like act_masks below)
        keep = ~torch.from_numpy(d.dead)[kr][:, col].T
        w_and = wrap_signed(torch.from_numpy(d.weight_and)[kr][:, col].T, nf.operand_bits).to(torch.int8) * keep
        w_or = wrap_signed(torch.from_numpy(d.weight_or)[kr][:, col].T, nf.operand_bits).to(torch.int8) * keep

    # act faults that reach at least one used column
    acts = [a for a in _act_segments(faults) if a[1] < min(C, out_per_group) - 1]
    n_a = len(acts)
    act_rows = torch.tensor([a[0] for a in acts], dtype=torch.long)
    act_c = torch.tensor([a[1] for a in acts], dtype=torch.long)
    act_k = (torch.arange(T)[:, None] * R + act_rows[None, :]).reshape(-1)
    act_masks = torch.tensor([[a[2] for a in acts], [a[3] for a in acts]], dtype=torch.int64).reshape(2, n_a)
    # int8 two's complement holds the 8-bit masks exactly; stuck bits on int8 need no re-signing
    act_masks = wrap_signed(act_masks, nf.operand_bits).to(torch.int8)
    applies = col[:, None] > act_c[None, :]  # (Og, n_a)
    # a later fault of the same row that also applies supersedes (its mask composes this one)
    later = (act_rows[:, None] == act_rows[None, :]) & (act_c[None, :] > act_c[:, None])  # (j, j')
    act_sel = applies & ~(applies[:, None, :] & later[None]).any(2)
    row_hit = torch.zeros(out_per_group, R, dtype=torch.bool)
    for j in range(n_a):
        row_hit[:, int(act_rows[j])] |= applies[:, j]
    row_keep = ~row_hit[:, kr]

    # psum faults per used column, in row order; a dead PE's psum fault no longer matters
    per_col: dict[int, list[int]] = {}
    for c in range(min(C, out_per_group)):
        rows = [r for r in range(R) if not d.dead[r, c] and (d.psum_and[r, c] != -1 or d.psum_or[r, c] != 0)]
        if rows:
            per_col[c] = rows
    rp = max((v[-1] + 1 for v in per_col.values()), default=0)

    def stuck_bits(r: int, c: int) -> list[tuple[int, int]]:
        a, o = int(d.psum_and[r, c]), int(d.psum_or[r, c])
        return [(b, 0) for b in range(nf.psum_bits) if not (a >> b) & 1] + [
            (b, 1) for b in range(nf.psum_bits) if (o >> b) & 1
        ]

    def steps_of(o: int) -> list[tuple[int, int, int]]:
        """(row, bit, value) of each stuck bit output o's psum meets, in row order."""
        c = int(col[o])
        return [(r, b, v) for r in per_col.get(c, []) for b, v in stuck_bits(r, c)]

    aff = [o for o in range(out_per_group) if int(col[o]) in per_col]
    o_steps = [steps_of(o) for o in aff]
    S = max((len(st) for st in o_steps), default=0)
    step_row = torch.zeros(len(aff), S, dtype=torch.long)
    step_mask = torch.zeros(len(aff), S, dtype=torch.long)
    step_carry = torch.zeros(len(aff), S, dtype=torch.long)
    for a, st in enumerate(o_steps):
        for i, (r, b, _) in enumerate(st):
            step_row[a, i], step_mask[a, i] = r, 1 << b
            step_carry[a, i] = sum(v << bb for _, bb, v in st[:i])
    out_const = [T * sum(v << b for _, b, v in st) for st in o_steps]
    # tile row r of output o is read from the stuck row of act fault j where act_sel[o, j]
    src = torch.arange(rp).repeat(len(aff), 1)  # (n_aff, rp): tile row r, or R + j: act fault j's stuck row
    for a, o in enumerate(aff):
        for j in torch.nonzero(act_sel[o]).flatten().tolist():
            if int(act_rows[j]) < rp:
                src[a, int(act_rows[j])] = R + j
    t = torch.arange(T).view(T, 1, 1)
    term_row = torch.where(src < R, t * R + src, TR + t * n_a + (src - R))

    def int32(v: list[int] | torch.Tensor) -> torch.Tensor:
        """Values mod 2^32 as int32 two's complement (the psum registers are 32 bits wide)."""
        return wrap_signed(torch.as_tensor(v, dtype=torch.int64), nf.psum_bits).to(torch.int32)

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
        act_k=act_k,
        act_masks=act_masks,
        row_keep=row_keep,
        act_sel=act_sel,
        aff=torch.tensor(aff, dtype=torch.long),
        rp=rp,
        psum=PsumSteps(
            term_row=term_row.contiguous(),
            step_row=step_row,
            step_mask=int32(step_mask),
            step_carry=int32(step_carry),
            n_steps=torch.tensor([len(st) for st in o_steps], dtype=torch.long),
        ),
        out_const=int32(out_const),
    )


def effective_weight(plan: LayerPlan, wq: torch.Tensor) -> torch.Tensor:
    """The weights the PEs multiply with: (G, Og, K) integer-valued -> (G, Og, TR) int8.

    Padded with zero weights to whole K-tiles, then weight stuck bits applied (on the
    int8 two's-complement encoding: the weight register itself) and dead PEs zeroed
    (bypass = fault-aware pruning).
    """
    w8 = F.pad(wq.to(torch.int8), (0, plan.TR - plan.K))
    if plan.w_and is None:
        return w8
    assert plan.w_or is not None
    return w8.bitwise_and_(plan.w_and).bitwise_or_(plan.w_or)


def array_weight(plan: LayerPlan, w8: torch.Tensor) -> torch.Tensor:
    """int8 weights on the extended lowered input: effective weights (G, Og, TR) ->
    (G, Og, TR + T * n_a). An output right of an act fault reads the fault's stuck row
    (with the clean row's weight) instead of the clean row."""
    if not plan.n_act:
        return w8
    G, Og, T, n_a = plan.G, plan.Og, plan.T, plan.n_act
    w_act = w8[:, :, plan.act_k].view(G, Og, T, n_a) * plan.act_sel.view(1, Og, 1, n_a)
    return torch.cat([w8 * plan.row_keep, w_act.view(G, Og, T * n_a)], dim=2)


def _fill_act_rows(plan: LayerPlan, cols: torch.Tensor) -> torch.Tensor:
    """Write the stuck act rows of an extended lowered input cols (G, TR + T*n_a, P)
    int8 whose first TR rows are filled; returns cols."""
    n_a, TR = plan.n_act, plan.TR
    if n_a:
        for g in range(cols.shape[0]):
            torch.index_select(cols[g, :TR], 0, plan.act_k, out=cols[g, TR:])
        stuck = cols[:, TR:].view(cols.shape[0], plan.T, n_a, -1)
        stuck.bitwise_and_(plan.act_masks[0].view(1, 1, n_a, 1)).bitwise_or_(plan.act_masks[1].view(1, 1, n_a, 1))
    return cols


def _scratch(slot: str, shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """An uninitialised contiguous tensor of `shape` and `dtype` on the device of `like`,
    from this thread's reusable buffer `slot` (grown as needed; fresh memory beyond
    WORKSPACE_MAX_BYTES). Valid until the next request of the same slot in this thread:
    for temporaries of one call only. On a GPU a fresh tensor (its caching allocator
    already reuses)."""
    nbytes = dtype.itemsize
    for d in shape:
        nbytes *= d
    if not kernels.on_host(like):
        return torch.empty(shape, dtype=dtype, device=like.device)
    if nbytes > WORKSPACE_MAX_BYTES:
        return torch.empty(shape, dtype=dtype)
    bufs: dict[str, torch.Tensor] = _workspace.__dict__.setdefault("bufs", {})
    buf = bufs.get(slot)
    if buf is None or buf.numel() < nbytes:
        buf = bufs[slot] = torch.empty(nbytes, dtype=torch.uint8)  # 64-byte aligned: any dtype views it
    return buf[:nbytes].view(dtype).view(shape)


def linear_cols(plan: LayerPlan, xq: torch.Tensor) -> torch.Tensor:
    """Extended lowered input (1, TR + T*n_a, B) int8 of an integer-valued x (B, K)."""
    cols = torch.empty(1, plan.rows, xq.shape[0], dtype=torch.int8, device=xq.device)
    cols[0, : plan.K].copy_(xq.t())
    cols[0, plan.K : plan.TR].zero_()  # positions past K hold activation 0
    return _fill_act_rows(plan, cols)


def conv_cols(
    plan: LayerPlan,
    xq: torch.Tensor,
    pads: tuple[int, int, int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Extended lowered input (G, TR + T*n_a, P) int8 (im2col, samples first) of an
    integer-valued conv input xq (N, Cin, H, W) zero-padded by pads (left, right, top,
    bottom), and (Ho, Wo, Wc): P = N * Ho * Wc positions, of which w < Wo in each
    output row are the outputs. K-index k of group g is input channel g*Cin_g + k //
    (kh*kw) at kernel position k % (kh*kw).

    With stride 1 the rows are "wide" (Wc = padded width): row k of sample n is then
    one contiguous run of the padded input, a fast copy; the positions w >= Wo wrap
    into the next input row and are computed but never read.
    """
    N, Cin, H, W = xq.shape
    left, right, top, bottom = pads
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    Hp, Wp = H + top + bottom, W + left + right
    Ho, Wo = (Hp - dh * (kh - 1) - 1) // sh + 1, (Wp - dw * (kw - 1) - 1) // sw + 1
    wide = sh == 1 and sw == 1
    # zero padding explicit (act faults hit it); wide rows of the last sample read
    # (kw-1)*dw elements past the end
    flat = _scratch("padded_input", (N * Cin * Hp * Wp + (kw - 1) * dw,), xq).zero_()
    xp = flat[: N * Cin * Hp * Wp].view(N, Cin, Hp, Wp)
    xp[:, :, top : top + H, left : left + W].copy_(xq)
    G = plan.G
    cin_g = Cin // G
    sN, sC = Cin * Hp * Wp, Hp * Wp
    Wc = Wp if wide else Wo
    cols = _scratch("lowered_input", (G, plan.rows, N * Ho * Wc), xq)
    if wide:
        src = flat.as_strided((G, cin_g, kh, kw, N, Ho * Wp), (cin_g * sC, sC, dh * Wp, dw, sN, 1))
        cols[:, : plan.K].view(G, cin_g, kh, kw, N, Ho * Wp).copy_(src)
    else:
        src = flat.as_strided((G, cin_g, kh, kw, N, Ho, Wo), (cin_g * sC, sC, dh * Wp, dw, sN, sh * Wp, sw))
        cols[:, : plan.K].view(G, cin_g, kh, kw, N, Ho, Wo).copy_(src)
    cols[:, plan.K : plan.TR].zero_()
    return _fill_act_rows(plan, cols), (Ho, Wo, Wc)


@functools.cache
def _int_mm_is_exact() -> bool:
    """Whether this CPU's int8 GEMM (torch._int_mm, oneDNN) is exact on extreme operands.
    Without VNNI, oneDNN may form int16 pair sums that saturate; then every int8 GEMM
    here runs in float64 instead (exact, slower). A property of the machine, probed once."""
    a = torch.tensor([[-128, 127, -128, 127] * 16, [127] * 64, [-128] * 64], dtype=torch.int8)
    b = torch.cat([a.t(), -a.t().clamp(min=-127)], dim=1).contiguous()
    return torch.equal(torch._int_mm(a, b), a.to(torch.int32) @ b.to(torch.int32))


# an int8 x int8 product is at most 2^14 in magnitude, so float32 (24-bit mantissa) sums up
# to this many of them exactly
FLOAT32_EXACT_ROWS = 1024


@functools.cache
def _int_mm_is_fast() -> bool:
    """Whether this CPU's int8 GEMM is exact and at least as fast as an exact float32 GEMM.
    With VNNI (AVX-512 or AVX) oneDNN's int8 kernels win; on CPUs without them (AMD znver2,
    say) torch._int_mm took about 1 s for one lenet5 conv GEMM that float32 does in
    milliseconds. Both are exact, so the choice changes only the time. Probed once."""
    if not _int_mm_is_exact():
        return False
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (256, 512), dtype=torch.int8, generator=gen)
    b = torch.randint(-128, 128, (512, 256), dtype=torch.int8, generator=gen)
    af, bf = a.float(), b.float()

    def best(fn: Any) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(lambda: torch._int_mm(a, b)) <= best(lambda: torch.matmul(af, bf))


def _int_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, J) @ b (J, P) on int8 operands -> int32, exact (J < 2^17 rows). On a CPU whose
    int8 GEMM is slow, in float32 (J <= FLOAT32_EXACT_ROWS) or float64; on a GPU in float64:
    exact, and free of the shape rules of its int8 GEMM (M > 16, J and P multiples of 8),
    which these layers often break, and of TF32."""
    host = kernels.on_host(a)
    if host and _int_mm_is_fast():
        return torch._int_mm(a, b, out=out)
    dtype = torch.float32 if host and a.shape[1] <= FLOAT32_EXACT_ROWS else torch.float64
    prod = torch.matmul(a.to(dtype), b.to(dtype))
    return prod.to(torch.int32) if out is None else out.copy_(prod)


def _int_gemm(w: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (M, P) int32 = w (M, J) @ x (J, P) on int8 operands, wrapped to int32 like the
    array's output buffer (exact int32 accumulation while J <= INT32_ROWS)."""
    J = w.shape[1]
    if J <= INT32_ROWS:
        return _int_mm(w, x, out=out)
    acc = torch.zeros(out.shape, dtype=torch.int64, device=out.device)
    for j in range(0, J, INT32_ROWS):
        acc += _int_mm(w[:, j : j + INT32_ROWS].contiguous(), x[j : j + INT32_ROWS])
    return out.copy_(acc)  # int64 -> int32 keeps the low 32 bits (two's complement)


@dataclass
class ArrayWeight:
    """A layer's integer weights prepared for one plan (`array_weights`): weight-dependent,
    input-independent, so reusable across calls while the weights stay the same.

    `dense`: without act or psum faults, the effective weights as float in the layer's
    weight shape. Otherwise `w8` (G, Og, J) int8, the `array_weight` rows on the first J
    rows of the extended input (J = K without act faults), and with psum faults
    `terms` (G, T, n_aff, rp) int8: the weight of each tile row an affected output's
    psum meets, on the input row `plan.psum.term_row` it reads.
    """

    shape: tuple[int, ...]
    dense: torch.Tensor | None = None
    w8: torch.Tensor | None = None
    terms: torch.Tensor | None = None


def array_weights(plan: LayerPlan, wq: torch.Tensor) -> ArrayWeight:
    """Prepare integer-valued weights wq (O, K) or (O, Cin/G, kh, kw) for `plan`."""
    return _arrange(plan, effective_weight(plan, wq.reshape(plan.G, plan.Og, plan.K)), tuple(wq.shape))


def quantized_array_weights(
    plan: LayerPlan, weight: torch.Tensor, q: Quantizer
) -> tuple[torch.Tensor, torch.Tensor, ArrayWeight]:
    """(wq, scale, prepared weights) of a layer's float weights: q.weight, then
    `array_weights`. The int8 quantizer's float32 weights on the CPU take one compiled
    pass for both (same numbers): layers prepare their weights again after every
    training step, and a dozen small tensor ops cost more than the work."""
    compiled = kernels.compiled()
    if type(q) is Int8Symmetric and weight.dtype == torch.float32 and kernels.on_host(weight) and compiled:
        wq, sw, w8 = compiled.quantize_int8(weight, plan.Og, plan.TR, plan.w_and, plan.w_or)
        return wq, sw, _arrange(plan, w8.view(plan.G, plan.Og, plan.TR), tuple(weight.shape))
    wq, sw = q.weight(weight)
    return wq, sw, array_weights(plan, wq)


def _arrange(plan: LayerPlan, w8: torch.Tensor, shape: tuple[int, ...]) -> ArrayWeight:
    """The ArrayWeight of effective weights w8 (G, Og, TR) int8 of a layer of weight shape `shape`."""
    if plan.clean_outputs:
        return ArrayWeight(shape, dense=w8[:, :, : plan.K].reshape(shape).to(exact_dtype(plan.TR << 14)))
    w8 = array_weight(plan, w8)
    terms = None
    if plan.n_aff:
        compiled = kernels.compiled()
        if compiled is not None and kernels.on_host(w8):
            terms = compiled.gather_terms(w8, plan.aff, plan.psum.term_row)
        else:
            idx = plan.cache.get("terms")  # w8[g, aff[a], term_row[t, a, r]] as flat indices into w8[g]
            if idx is None:
                idx = plan.cache["terms"] = (plan.aff.view(1, -1, 1) * w8.shape[2] + plan.psum.term_row).view(-1)
            terms = w8.view(plan.G, -1).index_select(1, idx).view(plan.G, *plan.psum.term_row.shape)
    if not plan.n_act:  # padding rows past K then read activation 0: left out of the main GEMM
        w8 = w8[:, :, : plan.K].contiguous()
    return ArrayWeight(shape, w8=w8, terms=terms)


def array_product(plan: LayerPlan, aw: ArrayWeight, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact int32 array output (G, Og, P) of the prepared weights aw on the extended
    input cols, except at the psum-affected outputs plan.aff, whose exact values are the
    second result (G, n_aff, P) int32 (None without psum faults): those outputs are
    dequantized from the wrapped value in float64.

    Psum faults: setting bit b to v adds 2^b (v - bit_b(p)) to the psum p, over all
    steps and tiles T K_last - sum (p & 2^b); the bits met come from the prefix sums of
    each affected output's psum in each tile (`kernels.psum_values`).
    """
    assert aw.w8 is not None
    y = _gemm_groups(aw.w8, cols[:, : aw.w8.shape[2]])
    if not plan.n_aff:
        return y, None
    assert aw.terms is not None
    return y, kernels.psum_values(cols, plan.psum, aw.terms, y, plan.aff, plan.out_const, PSUM_BLOCK)


def _gemm_groups(w8: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Per-group int8 GEMMs: w8 (G, M, J) @ cols (G, J, P) -> (G, M, P) int32."""
    out = torch.empty(w8.shape[0], w8.shape[1], cols.shape[2], dtype=torch.int32, device=cols.device)
    for g in range(w8.shape[0]):
        _int_gemm(w8[g], cols[g], out[g])
    return out


@dataclass
class ArrayProduct:
    """A layer's array output (N, O, ...): `y` holds the exact integers (float, or int32
    from the int8 path) everywhere except at output channels `chan` (psum-affected),
    whose exact values are `vals` (N, len(chan), ...) int32. `dtype` is the float type
    that dequantizes y exactly (None: y's own float type).

    `wide`: the int8 path's output as computed, of which y and vals are views: the
    array output (G, Og, N, Ho, Wc) int32, the psum values (G, n_aff, N, Ho, Wc) int32
    (n_aff may be 0), each output channel's index into them or -1 (O,) long, and Wo (a
    Linear layer's: G = Ho = Wc = Wo = 1, N = B). Dequantized in one pass by a kernel
    instead of a strided read per channel.
    """

    y: torch.Tensor
    chan: torch.Tensor | None = None
    vals: torch.Tensor | None = None
    dtype: torch.dtype | None = None
    wide: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None

    def _float_dtype(self) -> torch.dtype:
        return self.dtype or (self.y.dtype if self.y.is_floating_point() else torch.float32)

    def exact(self) -> torch.Tensor:
        """The whole exact integer output (float32 or float64)."""
        if self.chan is None:
            return self.y if self.y.is_floating_point() else self.y.to(torch.float64)
        assert self.vals is not None
        y = self.y.to(torch.float64)
        y[:, self.chan] = self.vals.to(y.dtype)
        return y

    def dequant(self, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """y * scale (+ bias) per output channel, in `dtype` (contiguous); patched
        channels are scaled from their exact values in float64. The product and the sum
        are rounded one after the other (no fused multiply-add), here and in the compiled
        `kernels.compiled().dequant_conv`: with or without numba a model gives the same
        floats."""
        fdt = self._float_dtype()
        compiled = kernels.compiled()
        if self.wide is not None and fdt == torch.float32 and compiled is not None and kernels.on_host(self.y):
            y, vals, slot, wo = self.wide
            b = torch.zeros_like(scale) if bias is None else bias
            out: torch.Tensor = compiled.dequant_conv(y, vals, slot, scale.float().contiguous(), b.float(), wo, dtype)
            return out.view(self.y.shape)  # a Linear layer's (B, O, 1, 1) as (B, O)
        view = (1, -1) + (1,) * (self.y.dim() - 2)
        sc = scale.to(fdt).view(view)
        if self.y.dtype == fdt and self.y.is_contiguous() and self.chan is None and bias is None:
            out = self.y.mul_(sc)
        else:  # int32 (or permuted) input read, contiguous float output written
            out = torch.mul(self.y, sc, out=torch.empty(self.y.shape, dtype=fdt, device=self.y.device))
        if bias is not None:  # rounded after the product, as in the kernel: the same floats
            out.add_(bias.to(fdt).view(view))
        out = out.to(dtype)
        if self.chan is not None:
            assert self.vals is not None
            v = self.vals.to(torch.float64).mul_(scale.to(torch.float64)[self.chan].view(view))
            if bias is not None:
                v += bias.to(torch.float64)[self.chan].view(view)
            if not kernels.on_host(out):  # one kernel, no host round trip for the channels
                out.index_copy_(1, self.chan, v.to(dtype))
            elif v.dim() > 2:  # conv: a copy per channel (to dtype on the way) of whole planes,
                # about twice as fast as an index_put over dim 1 plus a float32 temporary
                for a, c in enumerate(self.chan.tolist()):
                    out[:, c].copy_(v[:, a])
            else:
                out[:, self.chan] = v.to(dtype)
        return out


def _chan(plan: LayerPlan) -> torch.Tensor:
    """Global output channels of the psum-affected outputs (G * n_aff,), cached."""
    chan = plan.cache.get("chan")
    if chan is None:
        g = torch.arange(plan.G, device=plan.device)
        chan = plan.cache["chan"] = (g[:, None] * plan.Og + plan.aff[None, :]).reshape(-1)
    return chan


def _channel_slots(plan: LayerPlan) -> torch.Tensor:
    """(G * Og,) long: output channel g * Og + aff[a] -> a, the others -1, cached."""
    slots = plan.cache.get("slots")
    if slots is None:
        slots = plan.cache["slots"] = torch.full((plan.G * plan.Og,), -1, dtype=torch.long, device=plan.device)
        slots[_chan(plan)] = torch.arange(plan.n_aff, device=plan.device).repeat(plan.G)
    return slots


def _wide(
    plan: LayerPlan, y: torch.Tensor, patch: torch.Tensor | None, nhw: tuple[int, int, int], wo: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """`ArrayProduct.wide` of the int8 path's y (G, Og, P) and psum values patch (G,
    n_aff, P) or None, P = N * Ho * Wc positions (nhw = (N, Ho, Wc))."""
    y5 = y.view(plan.G, plan.Og, *nhw)
    vals5 = y5[:, :0] if patch is None else patch.view(plan.G, plan.n_aff, *nhw)
    return y5, vals5, _channel_slots(plan), wo


def linear_parts(plan: LayerPlan, xq: torch.Tensor, aw: ArrayWeight) -> ArrayProduct:
    """Array output for integer-valued x (B, K) and prepared weights aw of w (O, K):
    (B, O) (see ArrayProduct)."""
    dt = exact_dtype(plan.TR << 14)
    if aw.dense is not None:
        dense = aw.dense
        if not kernels.on_host(xq):
            return ArrayProduct(_on_gpu(lambda d: F.linear(xq.to(d), dense.to(d)), plan, dt))
        main = F.linear(xq.to(dt), dense)
        if plan.TR << 14 >= 1 << 31:  # only astronomically large K could overflow the int32 buffer
            main = _wrap_float(main.to(torch.float64), plan.ps_bits)
        return ArrayProduct(main)
    y, patch = array_product(plan, aw, linear_cols(plan, xq))
    wide = _wide(plan, y, patch, (xq.shape[0], 1, 1), 1)  # as a conv's with N = B, Ho = Wc = Wo = 1
    if patch is None:
        return ArrayProduct(y[0].t(), dtype=dt, wide=wide)
    return ArrayProduct(y[0].t(), _chan(plan), patch[0].t(), dtype=dt, wide=wide)


def _on_gpu(product: Callable[[torch.dtype], torch.Tensor], plan: LayerPlan, dt: torch.dtype) -> torch.Tensor:
    """A clean layer's integer output on a GPU: product(float64), rounded, wrapped like
    the int32 buffer, in dt. GPU libraries may pick algorithms that are not exact on
    integers (Winograd or FFT convolutions, TF32 or bf16 inputs): float64 keeps their
    error far below 0.5, so rounding restores the exact sum."""
    main = product(torch.float64).round_()
    if plan.TR << 14 >= 1 << 31:
        main = _wrap_float(main, plan.ps_bits)
    return main.to(dt)


def _wrap_float(v: torch.Tensor, bits: int) -> torch.Tensor:
    """wrap_signed for integer-valued float64 (exact below 2^53)."""
    half = float(1 << (bits - 1))
    return torch.remainder(v + half, 2 * half) - half


def linear_product(plan: LayerPlan, xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """Array output for integer-valued x (B, K) and w (O, K): (B, O) float (exact integers)."""
    return linear_parts(plan, xq, array_weights(plan, wq)).exact()


def fast_matmul(x: torch.Tensor, w: torch.Tensor, array: ArrayConfig, faults: FaultMap) -> torch.Tensor:
    """Fast path of `systolic_matmul`: same signature, same int64 (B, O) result."""
    check_integer_operands(x, w, array)
    plan = build_plan(array, faults, 1, w.shape[0], w.shape[1])
    return torch.round(linear_product(plan, x.double(), w.double())).to(torch.int64)


def conv_parts(
    plan: LayerPlan,
    xq: torch.Tensor,
    aw: ArrayWeight,
    pads: tuple[int, int, int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> ArrayProduct:
    """Array output of a conv: integer-valued input (N, Cin, H, W) zero-padded by pads
    (left, right, top, bottom), prepared weights aw of w (O, Cin/G, kh, kw) -> (N, O,
    Ho, Wo) (see ArrayProduct)."""
    G, (kh, kw) = plan.G, aw.shape[2:]
    dt = exact_dtype(plan.TR << 14)
    if aw.dense is not None:
        # zero padding meets no act fault here: the conv pads by itself (symmetric) and
        # padding rows of the last tile multiply activation 0
        left, right, top, bottom = pads
        dense = aw.dense

        def conv(d: torch.dtype) -> torch.Tensor:
            if left == right and top == bottom:
                return F.conv2d(xq.to(d), dense.to(d), None, stride, (top, left), dilation, G)
            return F.conv2d(F.pad(xq.to(d), pads), dense.to(d), None, stride, 0, dilation, G)

        if not kernels.on_host(xq):
            return ArrayProduct(_on_gpu(conv, plan, dt))
        main = conv(dt)
        if plan.TR << 14 >= 1 << 31:
            main = _wrap_float(main.to(torch.float64), plan.ps_bits)
        return ArrayProduct(main)
    cols, (Ho, Wo, Wc) = conv_cols(plan, xq, pads, (kh, kw), stride, dilation)
    y, patch = array_product(plan, aw, cols)
    N = xq.shape[0]

    def nchw(t: torch.Tensor) -> torch.Tensor:
        """(G, O', N * Ho * Wc) -> (N, G * O', Ho, Wo), a view."""
        return t.view(G, t.shape[1], N, Ho, Wc)[..., :Wo].permute(2, 0, 1, 3, 4).reshape(N, -1, Ho, Wo)

    wide = _wide(plan, y, patch, (N, Ho, Wc), Wo)
    if patch is None:
        return ArrayProduct(nchw(y), dtype=dt, wide=wide)
    return ArrayProduct(nchw(y), _chan(plan), nchw(patch), dtype=dt, wide=wide)
