"""Effective fault rate: where a chip's (or a fused group's) map sits on the resilience map.

The faulty-PE fraction alone ignores that a dead, bypassed PE is mild (fault-aware
pruning of a few weights) while a stuck high psum bit is severe (a huge offset on every
output of its column). The resilience map's rate axis is the faulty-PE fraction of maps
drawn from a reference fault mix, so the effective rate of a map is the rate of a
reference-mix map that hurts the model as much:

    effective_rate(map) = sum over faulty PEs of severity(PE) / number of PEs,

where severity(PE) is the largest severity of the faults on that PE, and the severity
of a fault depends on its class (site and bit band). Severities are measured once per
model (cheap inference, no training): the accuracy drop of maps holding only one class,
relative to the drop of reference-mix maps at the same rate, then scaled so that the
reference-mix maps' mean effective rate equals their nominal rate (the map's axis).
Uniform severities give back the plain faulty-PE fraction.

Why this and not the screening accuracy alone: the effective rate is a property of the
map, so it also places a *fused* map (which no chip has, so it has no screening
accuracy), and it is additive over disjoint PEs, which is what fusion does. The
screening-equivalent rate (`screening_equivalent_rate`) saturates once accuracy falls
to chance level; the planner can take the larger of the two for single chips
(`placement="conservative"`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from accelerator.faults import SITES, ArrayConfig, Fault, FaultMap
from planner.resilience import ResilienceMap, _monotone_worst
from planner.synthetic_fleet import FaultMix, sample_fault_map

BIT_BANDS = 4  # a register's bits in 4 bands of equal width, low to high


def bit_band(bit: int, width: int) -> int:
    return min(BIT_BANDS - 1, bit * BIT_BANDS // width)


def fault_class(fault: Fault, array: ArrayConfig) -> str:
    """``pe`` or ``site:band`` (band 0 = lowest quarter of the register's bits, 3 = highest)."""
    if fault.site == "pe":
        return "pe"
    assert fault.bit is not None
    return f"{fault.site}:{bit_band(fault.bit, array.bit_width(fault.site))}"


def fault_classes() -> list[str]:
    return ["pe"] + [f"{s}:{b}" for s in SITES if s != "pe" for b in range(BIT_BANDS)]


@dataclass(frozen=True)
class SiteSeverity:
    """Severity per fault class, 1.0 = as harmful per PE as the reference mix.

    Missing classes count 1.0. `meta` records how it was measured.
    """

    weights: Mapping[str, float] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def uniform(cls) -> SiteSeverity:
        return cls({}, {"kind": "uniform"})

    def of_fault(self, fault: Fault, array: ArrayConfig) -> float:
        return float(self.weights.get(fault_class(fault, array), 1.0))

    def pe_severities(self, fault_map: FaultMap) -> dict[tuple[int, int], float]:
        """Severity of each faulty PE: the largest of its faults'."""
        out: dict[tuple[int, int], float] = {}
        for f in fault_map.faults:
            s = self.of_fault(f, fault_map.array)
            key = (f.row, f.col)
            if s > out.get(key, -1.0):
                out[key] = s
        return out

    def effective_rate(self, fault_map: FaultMap) -> float:
        """Effective faulty-PE fraction of `fault_map` (see module doc); 0 for a clean map."""
        return sum(self.pe_severities(fault_map).values()) / fault_map.array.n_pes

    def to_dict(self) -> dict[str, Any]:
        return {"weights": dict(self.weights), "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> SiteSeverity:
        if not d:
            return cls.uniform()
        return cls({k: float(v) for k, v in d.get("weights", {}).items()}, dict(d.get("meta", {})))


@dataclass(frozen=True)
class SeverityTask:
    """One inference to run for the severity measurement: base model on `fault_map`.

    `fault_class` is a class name, or ``"reference"`` for a map of the reference mix.
    """

    fault_class: str
    sample: int
    fault_map: FaultMap


def severity_tasks(
    array: ArrayConfig, *, rate: float, samples: int, seed: int, mix: FaultMix | None = None
) -> list[SeverityTask]:
    """Maps to evaluate with the base model: `samples` per class and of the reference mix, at `rate`."""
    mix = mix or FaultMix()
    tasks = []
    classes = [c for c in fault_classes() if c != "pe" or array.bypass]
    names, _ = mix.site_probabilities(array)
    for ci, cls_name in enumerate(["reference", *classes]):
        if cls_name != "reference" and cls_name.split(":")[0] not in names:
            continue
        for s in range(samples):
            rng = np.random.default_rng([seed, ci, s])
            if cls_name == "reference":
                m = sample_fault_map(array, rate, rng, mix)
            elif cls_name == "pe":
                m = sample_fault_map(array, rate, rng, mix, sites=["pe"])
            else:
                site, band = cls_name.split(":")
                width = array.bit_width(site)
                lo, hi = int(band) * width // BIT_BANDS, (int(band) + 1) * width // BIT_BANDS
                m = sample_fault_map(array, rate, rng, mix, sites=[site], bits=(lo, hi))
            tasks.append(SeverityTask(cls_name, s, m))
    return tasks


def severity_from_measurements(
    results: Sequence[tuple[SeverityTask, float]],
    baseline: float,
    *,
    floor: float = 0.05,
    cap: float = 50.0,
    min_reference_drop: float = 0.005,
) -> SiteSeverity:
    """Severities from base-model accuracies on `severity_tasks` maps.

    raw(class) = mean drop of the class's maps / mean drop of the reference maps,
    clipped to [floor, cap]; then scaled so the reference maps' mean effective rate
    equals their mean faulty-PE fraction. If the reference maps cost less than
    `min_reference_drop` (the model shrugs the faults off at that rate) the ratios are
    noise, and uniform severities are returned.
    """
    drops: dict[str, list[float]] = {}
    for task, acc in results:
        drops.setdefault(task.fault_class, []).append(float(baseline) - float(acc))
    ref = [t.fault_map for t, _ in results if t.fault_class == "reference"]
    if "reference" not in drops or not ref:
        raise ValueError("severity: no reference measurements")
    ref_drop = float(np.mean(drops["reference"]))
    if ref_drop < min_reference_drop:
        return SiteSeverity({}, {"kind": "uniform", "reason": f"reference drop {ref_drop:.4f} too small"})
    raw = {
        c: float(np.clip(max(0.0, float(np.mean(v))) / ref_drop, floor, cap))
        for c, v in drops.items()
        if c != "reference"
    }
    provisional = SiteSeverity(raw)
    eff = float(np.mean([provisional.effective_rate(m) for m in ref]))
    nominal = float(np.mean([m.rate for m in ref]))
    scale = nominal / eff if eff > 0 else 1.0
    weights = {c: round(w * scale, 6) for c, w in sorted(raw.items())}
    return SiteSeverity(weights, {"kind": "measured", "reference_drop": ref_drop, "scale": scale})


def measure_site_severity(
    array: ArrayConfig,
    evaluate: Callable[[FaultMap], float],
    baseline: float,
    *,
    rate: float,
    samples: int,
    seed: int,
    mix: FaultMix | None = None,
) -> SiteSeverity:
    """Run `severity_tasks` in this process with `evaluate(map) -> accuracy` (base model)."""
    tasks = severity_tasks(array, rate=rate, samples=samples, seed=seed, mix=mix)
    return severity_from_measurements([(t, evaluate(t.fault_map)) for t in tasks], baseline)


def screening_equivalent_rate(accuracy: float, rmap: ResilienceMap) -> float:
    """Rate at which the map's conservative 0-epoch curve falls to `accuracy` (a screening result).

    Between (0, baseline) and the grid the curve is interpolated linearly; an accuracy
    below the curve at the last grid rate is placed past the map (`inf`).
    """
    rates = np.asarray((0.0, *rmap.rates))
    curve = np.concatenate([[rmap.baseline], _monotone_worst(rmap.worst)[:, 0]])
    curve = np.minimum.accumulate(curve)
    if accuracy >= curve[0]:
        return 0.0
    if accuracy < curve[-1]:
        return float("inf")
    i = int(np.nonzero(curve <= accuracy)[0][0])  # first grid point at or below the accuracy
    hi, lo = curve[i - 1], curve[i]
    frac = 0.0 if hi == lo else (hi - accuracy) / (hi - lo)
    return float(rates[i - 1] + frac * (rates[i] - rates[i - 1]))
