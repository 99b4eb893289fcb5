"""Seeded generator of realistic fleets of faulty chips, and their NDJSON files.

Defect statistics follow the usual yield models: the number of defects on a die is
negative binomial (a Poisson count whose density is Gamma-distributed per wafer, so
dies of one wafer are alike and wafers differ: clustering per wafer), denser towards
the wafer edge. Each defect hits a spatial cluster of neighbouring PEs inside the
array, and now and then a whole row or column. Every hit PE gets a permanent fault
drawn from a configurable mix of sites, bits and stuck values (`FaultMix`).

Files are NDJSON: one fault map per line in the REST JSON of DESIGN.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from accelerator.faults import SITES, ArrayConfig, Fault, FaultMap


@dataclass(frozen=True)
class FaultMix:
    """How a faulty PE's fault is drawn.

    `sites`: relative weight of each site (`pe`, `weight`, `act`, `psum`); `pe` is
    only drawn on arrays with bypass support. Bits are uniform over the register,
    except that `psum_high_bias` in [0, 1] skews psum bits towards the top (the
    severe ones): a psum bit is uniform over the upper half with that probability.
    `p_stuck1`: probability that the stuck value is 1.
    """

    sites: Mapping[str, float] = field(default_factory=lambda: {"pe": 0.25, "weight": 0.35, "act": 0.15, "psum": 0.25})
    psum_high_bias: float = 0.0
    p_stuck1: float = 0.5

    def site_probabilities(self, array: ArrayConfig) -> tuple[list[str], np.ndarray]:
        names = [s for s in SITES if self.sites.get(s, 0.0) > 0 and (s != "pe" or array.bypass)]
        if not names:
            raise ValueError("fault mix: no site with positive weight")
        p = np.array([float(self.sites[s]) for s in names])
        return names, p / p.sum()

    def to_dict(self) -> dict[str, Any]:
        return {"sites": dict(self.sites), "psum_high_bias": self.psum_high_bias, "p_stuck1": self.p_stuck1}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FaultMix:
        return cls(dict(d["sites"]), float(d.get("psum_high_bias", 0.0)), float(d.get("p_stuck1", 0.5)))


def draw_fault(row: int, col: int, site: str, array: ArrayConfig, mix: FaultMix, rng: np.random.Generator) -> Fault:
    """One fault of `site` on PE (row, col), with bit and stuck value drawn from `mix`."""
    if site == "pe":
        return Fault(row, col, "pe")
    width = array.bit_width(site)
    if site == "psum" and rng.random() < mix.psum_high_bias:
        bit = int(rng.integers(width // 2, width))
    else:
        bit = int(rng.integers(0, width))
    return Fault(row, col, site, bit, int(rng.random() < mix.p_stuck1))


def sample_fault_map(
    array: ArrayConfig,
    rate: float,
    rng: np.random.Generator,
    mix: FaultMix | None = None,
    *,
    sites: Iterable[str] | None = None,
    bits: tuple[int, int] | None = None,
) -> FaultMap:
    """A map with round(rate * PEs) faulty PEs (at least one when rate > 0), placed uniformly.

    Each faulty PE gets one fault drawn from `mix`; `sites` restricts the sites and
    `bits` = (lo, hi) restricts bits to lo <= bit < hi (clipped to the register). This
    is the sampler of the resilience map and of the severity measurement.
    """
    mix = mix or FaultMix()
    n = 0 if rate <= 0 else max(1, int(round(rate * array.n_pes)))
    n = min(n, array.n_pes)
    names, p = mix.site_probabilities(array)
    if sites is not None:
        allowed = set(sites)
        keep = [i for i, s in enumerate(names) if s in allowed]
        if not keep:
            raise ValueError(f"sample_fault_map: none of {sorted(allowed)} is in the mix")
        names = [names[i] for i in keep]
        p = p[keep] / p[keep].sum()
    pes = rng.choice(array.n_pes, size=n, replace=False)
    faults = []
    for idx in sorted(int(i) for i in pes):
        r, c = divmod(idx, array.cols)
        site = names[int(rng.choice(len(names), p=p))]
        f = draw_fault(r, c, site, array, mix, rng)
        if bits is not None and site != "pe":
            width = array.bit_width(site)
            lo, hi = max(0, bits[0]), min(width, bits[1])
            f = Fault(r, c, site, int(rng.integers(lo, max(lo + 1, hi))), f.stuck)
        faults.append(f)
    return FaultMap(array, tuple(faults))


@dataclass(frozen=True)
class FleetSpec:
    """Statistics of a generated fleet.

    `defects_per_die`: mean number of defects on a die (each one a cluster of PEs);
    `wafer_dispersion`: Gamma shape k of the per-wafer defect density (small k =
    strongly clustered wafers; the count per die is negative binomial);
    `edge_factor`: extra density at the wafer edge (density x (1 + edge_factor r^2),
    r the die's radius in [0, 1]); `cluster_mean_pes`: mean PEs hit by one defect;
    `p_line`: probability that a defect takes out a whole row or column;
    `dies_across`: dies per wafer diameter; `wafers_per_lot`.
    """

    array: ArrayConfig = field(default_factory=lambda: ArrayConfig(32, 32))
    accelerator: str | None = None
    defects_per_die: float = 2.0
    wafer_dispersion: float = 2.0
    edge_factor: float = 1.0
    cluster_mean_pes: float = 3.0
    p_line: float = 0.03
    dies_across: int = 12
    wafers_per_lot: int = 25
    mix: FaultMix = field(default_factory=FaultMix)

    @property
    def accelerator_name(self) -> str:
        if self.accelerator:
            return self.accelerator
        a = self.array
        shape = f"{a.rows}" if a.rows == a.cols else f"{a.rows}x{a.cols}"
        return f"sa{shape}-{a.fmt}"


def wafer_dies(dies_across: int) -> list[tuple[int, int, float]]:
    """Die coordinates (x, y) inside the round wafer, with their radius in [0, 1]."""
    c = (dies_across - 1) / 2
    out = []
    for y in range(dies_across):
        for x in range(dies_across):
            r = math.hypot(x - c, y - c) / (dies_across / 2)
            if r <= 1.0:
                out.append((x, y, r))
    return out


def _cluster(array: ArrayConfig, size: int, rng: np.random.Generator) -> set[tuple[int, int]]:
    """`size` neighbouring PEs grown from a random seed PE (random walk on the grid)."""
    r, c = int(rng.integers(array.rows)), int(rng.integers(array.cols))
    pes = {(r, c)}
    tries = 0
    while len(pes) < size and tries < 20 * size:
        tries += 1
        dr, dc = ((0, 1), (1, 0), (0, -1), (-1, 0))[int(rng.integers(4))]
        r, c = min(max(r + dr, 0), array.rows - 1), min(max(c + dc, 0), array.cols - 1)
        pes.add((r, c))
    return pes


def die_faults(spec: FleetSpec, n_defects: int, rng: np.random.Generator) -> tuple[Fault, ...]:
    """The faults of one die with `n_defects` defects (clusters and lines), one per hit register bit."""
    array = spec.array
    names, p = spec.mix.site_probabilities(array)
    faults: dict[tuple[int, int, str, int | None], Fault] = {}
    for _ in range(n_defects):
        site = names[int(rng.choice(len(names), p=p))]
        if rng.random() < spec.p_line:
            if rng.random() < 0.5:
                r = int(rng.integers(array.rows))
                pes = {(r, c) for c in range(array.cols)}
            else:
                c = int(rng.integers(array.cols))
                pes = {(r, c) for r in range(array.rows)}
        else:
            size = int(rng.geometric(1.0 / max(1.0, spec.cluster_mean_pes)))  # >= 1, mean cluster_mean_pes
            pes = _cluster(array, size, rng)
        for r, c in sorted(pes):
            f = draw_fault(r, c, site, array, spec.mix, rng)
            faults.setdefault(f.key, f)
    return tuple(faults.values())


def generate_fleet(n_chips: int, seed: int, spec: FleetSpec | None = None) -> list[FaultMap]:
    """`n_chips` fault maps in (lot, wafer, die) order, deterministic under `seed`.

    Chip ids read ``L{lot:03d}-W{wafer:02d}-X{x:02d}Y{y:02d}``.
    """
    spec = spec or FleetSpec()
    rng = np.random.default_rng(seed)
    dies = wafer_dies(spec.dies_across)
    chips: list[FaultMap] = []
    lot, wafer = 1, 1
    while len(chips) < n_chips:
        density = spec.defects_per_die * rng.gamma(spec.wafer_dispersion, 1.0 / spec.wafer_dispersion)
        for x, y, r in dies:
            if len(chips) >= n_chips:
                break
            n_defects = int(rng.poisson(density * (1.0 + spec.edge_factor * r * r)))
            chips.append(
                FaultMap(
                    spec.array,
                    die_faults(spec, n_defects, rng),
                    chip_id=f"L{lot:03d}-W{wafer:02d}-X{x:02d}Y{y:02d}",
                    accelerator=spec.accelerator_name,
                    lot=f"L{lot:03d}",
                    wafer=wafer,
                    die_x=x,
                    die_y=y,
                )
            )
        wafer += 1
        if wafer > spec.wafers_per_lot:
            lot, wafer = lot + 1, 1
    return chips


def write_ndjson(maps: Iterable[FaultMap], path: str | Path) -> int:
    """Write one fault map per line (REST JSON); returns the number of lines."""
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for m in maps:
            fh.write(json.dumps(m.to_dict(), separators=(",", ":")) + "\n")
            n += 1
    return n


def iter_ndjson(path: str | Path) -> Iterator[FaultMap]:
    """Fault maps of an NDJSON file; the array of each comes from the map itself.

    Raises `ValueError` naming the line of a bad map.
    """
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield FaultMap.from_dict(json.loads(line))
            except (ValueError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}:{i}: {e}") from e


def read_ndjson(path: str | Path) -> list[FaultMap]:
    return list(iter_ndjson(path))


def parse_site_weights(text: str) -> dict[str, float]:
    """``pe=0.1,weight=0.3,act=0.3,psum=0.3`` -> relative site weights for `FaultMix.sites`.

    Raises `ValueError` naming the offending entry.
    """
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if name not in SITES or weight < 0:
            raise ValueError(f"sites: {part!r} is not SITE=WEIGHT with SITE one of {list(SITES)} and WEIGHT >= 0")
        out[name] = weight
    return out
