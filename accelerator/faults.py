"""Fault-map types of the emulated systolic array: the JSON the test line sends.

This module is free of torch on purpose: `planner/` and the service import it to
validate, hash, fuse and measure fault maps without pulling in a training stack.

Semantics (see DESIGN.md): each `Fault` is a permanent stuck-at on one bit of one
register of processing element (row, col), or a dead PE (`site="pe"`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SITES: tuple[str, ...] = ("pe", "weight", "act", "psum")


def _is_int(value: Any) -> bool:
    """An integer proper: not a bool (True == 1), not a float (1.0 == 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class NumberFormat:
    """How operands and partial sums are encoded on the array.

    The extension point for new formats: a fault on bit `b` of a register is applied
    to the register's raw encoding, so a format only has to say how wide its operand
    (weight, activation) and accumulator (psum) registers are.
    """

    name: str
    operand_bits: int
    psum_bits: int


NUMBER_FORMATS: dict[str, NumberFormat] = {
    "int8": NumberFormat("int8", operand_bits=8, psum_bits=32),
}


@dataclass(frozen=True)
class ArrayConfig:
    """A weight-stationary systolic array of `rows` x `cols` PEs."""

    rows: int
    cols: int
    fmt: str = "int8"
    bypass: bool = True

    def __post_init__(self) -> None:
        if not _is_int(self.rows) or not _is_int(self.cols):
            raise ValueError(f"array: rows and cols must be integers, got {self.rows!r} x {self.cols!r}")
        if not (1 <= self.rows <= 4096 and 1 <= self.cols <= 4096):
            raise ValueError(f"array: rows and cols must be in 1..4096, got {self.rows} x {self.cols}")
        if self.fmt not in NUMBER_FORMATS:
            raise ValueError(f"array: unknown number format {self.fmt!r}; known: {sorted(NUMBER_FORMATS)}")

    @property
    def number_format(self) -> NumberFormat:
        return NUMBER_FORMATS[self.fmt]

    @property
    def n_pes(self) -> int:
        return self.rows * self.cols

    def bit_width(self, site: str) -> int:
        """Width in bits of the register that a fault at `site` sits on (0 for `pe`)."""
        nf = self.number_format
        return {"pe": 0, "weight": nf.operand_bits, "act": nf.operand_bits, "psum": nf.psum_bits}[site]


@dataclass(frozen=True, order=True)
class Fault:
    """One permanent fault of PE (`row`, `col`).

    `site` is one of `pe` (dead PE, no bit), `weight`, `act` (bit 0..7 for int8) or
    `psum` (bit 0..31); `stuck` is the value (0 or 1) the bit is stuck at.
    """

    row: int
    col: int
    site: str
    bit: int | None = None
    stuck: int | None = None

    @property
    def key(self) -> tuple[int, int, str, int | None]:
        """Identity of the faulty register bit: two faults with one key are a duplicate."""
        return (self.row, self.col, self.site, self.bit)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"row": self.row, "col": self.col, "site": self.site}
        if self.site != "pe":
            d["bit"] = self.bit
            d["stuck"] = self.stuck
        return d


def _fault_from_dict(d: Any, where: str, array: ArrayConfig) -> Fault:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: must be an object, got {type(d).__name__}")
    unknown = set(d) - {"row", "col", "site", "bit", "stuck"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
    for name in ("row", "col", "site"):
        if name not in d:
            raise ValueError(f"{where}.{name}: missing")
    site = d["site"]
    if site not in SITES:
        raise ValueError(f"{where}.site: {site!r} is not one of {list(SITES)}")
    row, col = d["row"], d["col"]
    for name, value, limit in (("row", row, array.rows), ("col", col, array.cols)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{where}.{name}: must be an integer, got {value!r}")
        if not 0 <= value < limit:
            raise ValueError(f"{where}.{name}: {value} out of range 0..{limit - 1}")
    if site == "pe":
        if d.get("bit") is not None or d.get("stuck") is not None:
            raise ValueError(f"{where}: a dead PE (site 'pe') takes no bit or stuck value")
        if not array.bypass:
            raise ValueError(f"{where}: dead PE at ({row}, {col}) but the array has no bypass support")
        return Fault(row, col, "pe")
    bit, stuck = d.get("bit"), d.get("stuck")
    width = array.bit_width(site)
    if not isinstance(bit, int) or isinstance(bit, bool):
        raise ValueError(f"{where}.bit: must be an integer for site {site!r}, got {bit!r}")
    if not 0 <= bit < width:
        raise ValueError(f"{where}.bit: {bit} out of range 0..{width - 1} for site {site!r}")
    if not _is_int(stuck) or stuck not in (0, 1):
        raise ValueError(f"{where}.stuck: must be 0 or 1, got {stuck!r}")
    return Fault(row, col, site, bit, stuck)


@dataclass(frozen=True)
class DenseFaults:
    """Dense (rows, cols) view of a fault map for vectorised fast paths.

    A stuck-at is applied to a register's raw two's-complement bits as
    `(raw & and_mask) | or_mask`. Masks are int64 arrays of shape (rows, cols):
    all-ones / zero where a register is clean. `dead` is a bool (rows, cols) array.
    `psum_faults` lists (row, col, and_mask, or_mask) in row order per column, the
    order in which chained psum faults apply.
    """

    dead: np.ndarray
    weight_and: np.ndarray
    weight_or: np.ndarray
    act_and: np.ndarray
    act_or: np.ndarray
    psum_and: np.ndarray
    psum_or: np.ndarray

    @property
    def has_weight(self) -> bool:
        return bool(self.dead.any() or (self.weight_or != 0).any() or (self.weight_and != -1).any())


@dataclass(frozen=True)
class FaultMap:
    """The permanent faults of one chip (or a fused group) on an `ArrayConfig`.

    Faults are kept sorted and de-duplicated, so equal maps compare and hash equal.
    """

    array: ArrayConfig
    faults: tuple[Fault, ...] = ()
    chip_id: str | None = None
    accelerator: str | None = None
    lot: str | None = None
    wafer: int | None = None
    die_x: int | None = None
    die_y: int | None = None
    _dense: list[DenseFaults] = field(default_factory=list, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        faults = tuple(sorted(self.faults))
        keys = [f.key for f in faults]
        if len(set(keys)) != len(keys):
            seen: set[tuple[int, int, str, int | None]] = set()
            for f in faults:
                if f.key in seen:
                    raise ValueError(f"faults: duplicate fault {f.to_dict()}")
                seen.add(f.key)
        object.__setattr__(self, "faults", faults)

    # --- JSON -----------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], array: ArrayConfig | None = None) -> FaultMap:
        """Parse and validate the JSON of DESIGN.md.

        `array` is the registered profile the map claims (its fmt and bypass apply);
        without it the map's own `array` is taken with int8 and bypass. Raises
        `ValueError` whose message starts with the offending field, e.g.
        ``faults[2].bit: 9 out of range 0..7 for site 'weight'``.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"fault map: must be an object, got {type(d).__name__}")
        a = d.get("array")
        if not isinstance(a, Mapping) or "rows" not in a or "cols" not in a:
            raise ValueError("array: must be an object with rows and cols")
        for dim in ("rows", "cols"):
            if not _is_int(a[dim]):  # JSON true == 1 and 4.0 == 4 in Python: neither is an integer
                raise ValueError(f"array.{dim}: must be an integer, got {a[dim]!r}")
        if array is None:
            array = ArrayConfig(a["rows"], a["cols"])
        elif (a["rows"], a["cols"]) != (array.rows, array.cols):
            raise ValueError(
                f"array: {a['rows']}x{a['cols']} does not match accelerator profile "
                f"{d.get('accelerator')!r} ({array.rows}x{array.cols})"
            )
        raw = d.get("faults", [])
        if not isinstance(raw, list):
            raise ValueError("faults: must be a list")
        faults = [_fault_from_dict(f, f"faults[{i}]", array) for i, f in enumerate(raw)]
        seen: dict[tuple[int, int, str, int | None], int] = {}
        for i, f in enumerate(faults):
            if f.key in seen:
                raise ValueError(f"faults[{i}]: duplicate of faults[{seen[f.key]}] ({f.to_dict()})")
            seen[f.key] = i
        meta: dict[str, Any] = {}
        for name, typ in (
            ("chip_id", str),
            ("accelerator", str),
            ("lot", str),
            ("wafer", int),
            ("die_x", int),
            ("die_y", int),
        ):
            v = d.get(name)
            if v is not None and (not isinstance(v, typ) or isinstance(v, bool)):
                raise ValueError(f"{name}: must be {typ.__name__}, got {v!r}")
            meta[name] = v
        return cls(array=array, faults=tuple(faults), **meta)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.chip_id is not None:
            d["chip_id"] = self.chip_id
        if self.accelerator is not None:
            d["accelerator"] = self.accelerator
        d["array"] = {"rows": self.array.rows, "cols": self.array.cols}
        d["faults"] = [f.to_dict() for f in self.faults]
        for name in ("lot", "wafer", "die_x", "die_y"):
            v = getattr(self, name)
            if v is not None:
                d[name] = v
        return d

    # --- identity and measures --------------------------------------------------
    @property
    def digest(self) -> str:
        """sha256 (hex) of the array shape, format and faults; chip metadata excluded."""
        body = {
            "array": [self.array.rows, self.array.cols, self.array.fmt, self.array.bypass],
            "faults": [[f.row, f.col, f.site, f.bit, f.stuck] for f in self.faults],
        }
        return hashlib.sha256(json.dumps(body, separators=(",", ":")).encode()).hexdigest()

    @property
    def faulty_pes(self) -> frozenset[tuple[int, int]]:
        return frozenset((f.row, f.col) for f in self.faults)

    @property
    def dead_pes(self) -> frozenset[tuple[int, int]]:
        """The PEs (row, col) with a `pe` fault: dead, or bypassed at deployment."""
        return frozenset((f.row, f.col) for f in self.faults if f.site == "pe")

    @property
    def rate(self) -> float:
        """Fraction of PEs with at least one fault, in [0, 1]."""
        return len(self.faulty_pes) / self.array.n_pes

    def __len__(self) -> int:
        return len(self.faults)

    def with_faults(self, faults: Iterable[Fault]) -> FaultMap:
        """The same chip and array with another set of faults."""
        return FaultMap(
            self.array, tuple(faults), self.chip_id, self.accelerator, self.lot, self.wafer, self.die_x, self.die_y
        )

    @staticmethod
    def union(*maps: FaultMap, chip_id: str | None = None) -> FaultMap:
        """The fused map of several chips on one array: every fault of every map.

        Two maps may stick the same bit at different values; the emulated chip can
        hold only one, so the first map in argument order wins (deterministic).
        """
        if not maps:
            raise ValueError("union: needs at least one fault map")
        array = maps[0].array
        for m in maps[1:]:
            if m.array != array:
                raise ValueError(f"union: array {m.array} differs from {array}")
        merged: dict[tuple[int, int, str, int | None], Fault] = {}
        for m in maps:
            for f in m.faults:
                merged.setdefault(f.key, f)
        return FaultMap(array, tuple(merged.values()), chip_id=chip_id, accelerator=maps[0].accelerator)

    def dense(self) -> DenseFaults:
        """Dense numpy masks (cached); see `DenseFaults`."""
        if self._dense:
            return self._dense[0]
        shape = (self.array.rows, self.array.cols)
        dead = np.zeros(shape, dtype=bool)
        masks = {
            s: (np.full(shape, -1, dtype=np.int64), np.zeros(shape, dtype=np.int64)) for s in ("weight", "act", "psum")
        }
        for f in self.faults:
            if f.site == "pe":
                dead[f.row, f.col] = True
                continue
            assert f.bit is not None
            and_m, or_m = masks[f.site]
            if f.stuck:
                or_m[f.row, f.col] |= 1 << f.bit
            else:
                and_m[f.row, f.col] &= ~(1 << f.bit)
        view = DenseFaults(dead, *masks["weight"], *masks["act"], *masks["psum"])
        self._dense.append(view)
        return view


# Bypass policies. "faulty": every PE whose own weight or psum register is stuck
# (DESIGN.md: a bypassed PE's weight and psum faults no longer matter). "shadowed": also
# every PE right of a stuck activation register in its row, the PEs that would multiply
# the stuck value; their weights then act as 0, so the act fault has no effect.
# "upper_3q", "upper_half", "upper_quarter": what "shadowed" does, only for faults whose
# stuck bit lies in the upper three quarters, half or quarter of its register's bits. A
# stuck low-order bit moves a value by at most 2^bit, often less than losing the PE (or,
# for an act fault, a row's worth of PEs) costs; a stuck high-order bit is far worse.
BYPASS_POLICIES: tuple[str, ...] = ("faulty", "shadowed", "upper_3q", "upper_half", "upper_quarter")
# the fraction of a register's bits, counted from the bottom, below which a policy leaves a fault alone
_LOWEST_BYPASSED_BIT = {"faulty": 0.0, "shadowed": 0.0, "upper_3q": 0.25, "upper_half": 0.5, "upper_quarter": 0.75}


def bypassed_pes(fault_map: FaultMap, policy: str = "faulty") -> list[tuple[int, int]]:
    """The PEs (row, col), sorted, that `policy` bypasses beyond the map's dead ones (see `bypass_faulty_pes`)."""
    if policy not in BYPASS_POLICIES:
        raise ValueError(f"bypass: unknown policy {policy!r}; known: {list(BYPASS_POLICIES)}")
    if not fault_map.array.bypass:
        raise ValueError(f"bypass: array {fault_map.array.rows}x{fault_map.array.cols} has no bypass support")
    array = fault_map.array
    lowest = _LOWEST_BYPASSED_BIT[policy]
    hit = [f for f in fault_map.faults if f.bit is not None and f.bit >= lowest * array.bit_width(f.site)]
    pes = {(f.row, f.col) for f in hit if f.site in ("weight", "psum")}
    if policy != "faulty":
        pes |= {(f.row, c) for f in hit if f.site == "act" for c in range(f.col + 1, array.cols)}
    return sorted(pes - fault_map.dead_pes)


def bypass_pes(fault_map: FaultMap, pes: Iterable[tuple[int, int]]) -> FaultMap:
    """The map as deployed with PEs `pes` (row, col) bypassed: a `pe` fault added on each
    one not dead already; the same object when nothing is added. Raises ValueError when
    the array has no bypass support and there is something to bypass."""
    extra = sorted(set(pes) - fault_map.dead_pes)
    if not extra:
        return fault_map
    if not fault_map.array.bypass:
        raise ValueError(f"bypass: array {fault_map.array.rows}x{fault_map.array.cols} has no bypass support")
    return fault_map.with_faults((*fault_map.faults, *(Fault(r, c, "pe") for r, c in extra)))


def bypass_faulty_pes(fault_map: FaultMap, policy: str = "faulty") -> FaultMap:
    """The map as deployed with PEs bypassed under `policy` (fault-aware pruning), see `BYPASS_POLICIES`.

    Zhang et al.'s FAP: a stuck weight, psum or activation bit, a high one above all,
    can be far worse than losing the PE, whose weights then act as 0 (a pruned weight,
    which retraining compensates). The bypass is the array's own (`ArrayConfig.bypass`),
    configured per chip at deployment, so the result is the chip's map plus a `pe` fault
    on each bypassed PE; the same object when nothing is added. Raises ValueError when
    the array has no bypass support or the policy is unknown.
    """
    return bypass_pes(fault_map, bypassed_pes(fault_map, policy))
