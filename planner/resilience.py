"""eFAT resilience map: accuracy over fault rates x retraining epochs, and how many epochs a rate needs.

A map is built once per (model, dataset, accelerator profile). Each grid rate gets
`samples` random fault maps (`planner.synthetic_fleet.sample_fault_map`); each sampled map is
retrained for the largest epochs on the grid and evaluated after each epochs count on the
grid (0 = the base model), so one training run measures a whole column of the map.
That unit of work is a `CellTask`; how it is measured is a callback (`MeasureCell`),
so the service can fan tasks out to Celery workers and tests can use a fake.

A cell may be *not measured* (NaN in `mean` and `worst`): an adaptive map
(`workers.adaptive_map`) trains only the cells a fleet's retraining epochs depend on. A cell not
measured never meets a constraint, is skipped by the running minimum over rates (the
measured cells below it still bound the measured cells above), and is `None` in JSON. The
0-epoch column is always measured: screening placement reads it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from accelerator.faults import ArrayConfig, FaultMap
from planner.constraint import AccuracyConstraint, meets, meets_each
from planner.synthetic_fleet import FaultMix, sample_fault_map


def task_seed(seed: int, rate_index: int, sample: int) -> int:
    """Seed of one sampled fault map: independent of the epochs, so every epochs count sees the same map."""
    return int(np.random.SeedSequence([int(seed), int(rate_index), int(sample)]).generate_state(1)[0])


@dataclass(frozen=True)
class CellTask:
    """One sampled fault map at grid rate `rate` (faulty-PE fraction), to be retrained.

    The measurement retrains the base model on `fault_map(...)` and returns the top-1
    accuracy (fraction) after each count of `epochs` (ascending, 0 = base model),
    evaluated on that same map.
    """

    rate_index: int
    rate: float
    sample: int
    seed: int
    epochs: tuple[int, ...]

    def fault_map(self, array: ArrayConfig, mix: FaultMix | None = None) -> FaultMap:
        return sample_fault_map(array, self.rate, np.random.default_rng(self.seed), mix)

    @property
    def training_epochs(self) -> int:
        return max(self.epochs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rate_index": self.rate_index,
            "rate": self.rate,
            "sample": self.sample,
            "seed": self.seed,
            "epochs": list(self.epochs),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CellTask:
        return cls(int(d["rate_index"]), float(d["rate"]), int(d["sample"]), int(d["seed"]), tuple(d["epochs"]))


MeasureCell = Callable[[CellTask], Sequence[float]]


def _monotone_worst(worst: np.ndarray) -> np.ndarray:
    """Running minimum over rates: a higher rate is never credited with a better accuracy.

    Over measured cells only: a cell not measured (NaN) stays NaN and bounds nothing, so
    it never lends a lower rate's accuracy to itself nor poisons the rates above it.
    """
    running = np.fmin.accumulate(worst, axis=0)
    return np.where(np.isnan(worst), np.nan, running)


def _cells_to_json(a: np.ndarray) -> list[list[float | None]]:
    """Rows of a cell array, `None` where not measured (NaN is not JSON)."""
    return [[None if np.isnan(v) else float(v) for v in row] for row in a]


@dataclass
class ResilienceMap:
    """Accuracy (fractions) on a grid `rates` (ascending faulty-PE fractions) x `epochs` (ascending, 0 first).

    `mean[i, j]` and `worst[i, j]` are over the sampled maps at `rates[i]` after
    `epochs[j]` epochs of fault-aware retraining; `baseline` is the fault-free
    accuracy of the base model. `meta` says what it was built for (model, dataset,
    array, fault mix, seed).
    """

    rates: tuple[float, ...]
    epochs: tuple[int, ...]
    mean: np.ndarray
    worst: np.ndarray
    baseline: float
    samples: int = 1
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rates = tuple(float(r) for r in self.rates)
        self.epochs = tuple(int(e) for e in self.epochs)
        self.mean = np.asarray(self.mean, dtype=float)
        self.worst = np.asarray(self.worst, dtype=float)
        shape = (len(self.rates), len(self.epochs))
        if not self.rates or not self.epochs:
            raise ValueError("resilience map: needs at least one rate and one epochs count")
        if list(self.rates) != sorted(set(self.rates)) or self.rates[0] < 0:
            raise ValueError(f"resilience map: rates must be ascending, distinct and >= 0, got {self.rates}")
        if list(self.epochs) != sorted(set(self.epochs)) or self.epochs[0] != 0:
            raise ValueError(f"resilience map: epochs must be ascending, distinct and start at 0, got {self.epochs}")
        if self.mean.shape != shape or self.worst.shape != shape:
            raise ValueError(f"resilience map: mean/worst must have shape {shape}")
        if np.any(self.worst > self.mean + 1e-12):
            raise ValueError("resilience map: worst accuracy above mean in some cell")
        if not np.array_equal(np.isnan(self.mean), np.isnan(self.worst)):
            raise ValueError("resilience map: mean and worst must leave the same cells not measured (NaN)")
        if np.isnan(self.worst[:, 0]).any():
            raise ValueError("resilience map: the 0-epoch column must be measured at every rate")

    # --- building -----------------------------------------------------------------
    @staticmethod
    def cell_tasks(rates: Sequence[float], epochs: Sequence[int], samples: int, seed: int) -> list[CellTask]:
        """Every unit of work of a map: `samples` sampled maps per rate, each measured at all `epochs`."""
        ep = tuple(sorted({0, *(int(e) for e in epochs)}))
        rs = sorted(float(r) for r in rates)
        return [CellTask(i, r, s, task_seed(seed, i, s), ep) for i, r in enumerate(rs) for s in range(samples)]

    @classmethod
    def assemble(
        cls,
        results: Iterable[tuple[CellTask, Sequence[float]]],
        baseline: float,
        *,
        meta: dict[str, Any] | None = None,
    ) -> ResilienceMap:
        """The map from externally measured tasks: (task, accuracy after each of task.epochs)."""
        pairs = sorted(results, key=lambda p: (p[0].rate_index, p[0].sample))  # order-independent sums
        if not pairs:
            raise ValueError("resilience map: no measurements")
        epochs = pairs[0][0].epochs
        rates = sorted({t.rate for t, _ in pairs})
        acc: dict[float, list[Sequence[float]]] = {r: [] for r in rates}
        for t, values in pairs:
            if t.epochs != epochs:
                raise ValueError(f"resilience map: task {t} measured epochs {t.epochs}, expected {epochs}")
            if len(values) != len(epochs):
                raise ValueError(
                    f"resilience map: task {t} returned {len(values)} accuracies for {len(epochs)} epochs counts"
                )
            acc[t.rate].append([float(v) for v in values])
        samples = min(len(v) for v in acc.values())
        mean = np.array([np.mean(acc[r], axis=0) for r in rates])
        worst = np.array([np.min(acc[r], axis=0) for r in rates])
        return cls(tuple(rates), epochs, mean, worst, float(baseline), samples, dict(meta or {}))

    @classmethod
    def build(
        cls,
        rates: Sequence[float],
        epochs: Sequence[int],
        samples: int,
        measure_cell: MeasureCell,
        *,
        baseline: float,
        seed: int,
        meta: dict[str, Any] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> ResilienceMap:
        """Measure every `cell_tasks(...)` task in this process with `measure_cell` and assemble the map."""
        tasks = cls.cell_tasks(rates, epochs, samples, seed)
        results = []
        for n, t in enumerate(tasks, start=1):
            results.append((t, measure_cell(t)))
            if on_progress is not None:
                on_progress(n, len(tasks))
        return cls.assemble(results, baseline, meta={**(meta or {}), "seed": seed})

    @classmethod
    def ladder(cls, epochs: Sequence[int], baseline: float) -> ResilienceMap:
        """A map with no measurements: an escalation ladder of epochs (`epochs`, 0 first).

        It credits every chip that fails screening with the smallest positive epochs
        and leaves the rest to verification, which climbs the ladder warm (`planner.replan`):
        what a map would predict is then learned by training, which costs nothing extra
        when every rung continues the last. Placement: the 0-epoch curve falls linearly
        from the baseline to 0 at rate 1, so a chip's rate is its relative accuracy loss.
        Its training cost is 0 (`samples` 0).
        """
        ep = tuple(sorted({0, *(int(e) for e in epochs)}))
        if len(ep) < 2:
            raise ValueError(f"ladder: needs a positive epochs count, got {tuple(epochs)}")
        row = [0.0] + [float(baseline)] * (len(ep) - 1)
        return cls((1.0,), ep, np.array([row]), np.array([row]), float(baseline), 0, {"kind": "ladder"})

    @property
    def is_ladder(self) -> bool:
        """Whether this is `ladder`'s map without measurements."""
        return self.meta.get("kind") == "ladder"

    @property
    def training_epochs(self) -> int:
        """Epochs trained to build the map: one run of the largest epochs per sampled map, or
        `meta["cell_epochs"]` where the builder trained less (an adaptive map)."""
        if "cell_epochs" in self.meta:
            return int(self.meta["cell_epochs"])
        return len(self.rates) * self.samples * max(self.epochs)

    @property
    def measured(self) -> np.ndarray:
        """Boolean (rates x epochs): the cells measured (all of them, but in an adaptive map)."""
        return ~np.isnan(self.worst)

    # --- queries ------------------------------------------------------------------
    def worst_at(self, rate: float, epochs_index: int) -> float | None:
        """Conservative accuracy at `rate` after `epochs[epochs_index]` epochs.

        Worst case over samples, made non-increasing in rate (running minimum),
        linearly interpolated between grid rates. Below the first grid rate the first
        point's value applies (no optimistic extrapolation towards the baseline);
        past the last grid rate the map knows nothing: None. None too where a cell the
        value depends on was not measured.
        """
        rates = np.asarray(self.rates)
        if rate > rates[-1] + 1e-12:
            return None
        curve = _monotone_worst(self.worst)[:, epochs_index]
        value = float(curve[0]) if rate <= rates[0] else float(np.interp(rate, rates, curve))
        return None if np.isnan(value) else value

    def required_epochs(self, rate: float, constraint: AccuracyConstraint) -> int | None:
        """Smallest epochs on the map whose conservative accuracy at `rate` meets `constraint`.

        `rate` is an effective faulty-PE fraction (`planner.severity`); None when no
        epochs on the map suffice or `rate` lies past the last grid rate.
        """
        threshold = constraint.threshold(self.baseline)
        for j, e in enumerate(self.epochs):
            acc = self.worst_at(rate, j)
            if acc is not None and meets(acc, threshold):
                return e
        return None

    def required_epochs_array(self, rates: np.ndarray, constraint: AccuracyConstraint) -> np.ndarray:
        """`required_epochs` for many rates at once (int64; -1 where it would be None)."""
        r = np.asarray(rates, dtype=float)
        threshold = constraint.threshold(self.baseline)
        grid = np.asarray(self.rates)
        curves = _monotone_worst(self.worst)
        out = np.full(r.shape, -1, dtype=np.int64)
        inside = r <= grid[-1] + 1e-12
        for j in reversed(range(len(self.epochs))):  # the smallest meeting epochs end up last
            acc = np.interp(np.maximum(r, grid[0]), grid, curves[:, j])
            out[inside & meets_each(acc, threshold)] = self.epochs[j]
        return out

    def fixable(self, rate: float, constraint: AccuracyConstraint) -> bool:
        return self.required_epochs(rate, constraint) is not None

    def max_fixable_rate(self, constraint: AccuracyConstraint) -> float | None:
        """Largest rate at which some epochs on the map meet `constraint` (None: not even the first rate)."""
        threshold = constraint.threshold(self.baseline)
        curves = _monotone_worst(self.worst)
        best: float | None = None
        for j in range(len(self.epochs)):
            c = curves[:, j]
            ok = np.nonzero(meets_each(c, threshold))[0]
            if len(ok) == 0:
                continue
            i = int(ok[-1])
            if i == len(self.rates) - 1 or np.isnan(c[i + 1]):  # past it the map knows nothing
                r = self.rates[i]
            else:
                frac = (c[i] - threshold) / (c[i] - c[i + 1])
                r = self.rates[i] + float(frac) * (self.rates[i + 1] - self.rates[i])
            best = r if best is None else max(best, r)
        return best

    def next_epochs(self, epochs: int) -> int | None:
        """The next larger epochs on the map after `epochs`, or None past the largest."""
        larger = [e for e in self.epochs if e > epochs]
        return larger[0] if larger else None

    @property
    def largest_epochs(self) -> int:
        """The largest epochs on the map (the top rung)."""
        return self.epochs[-1]

    @property
    def smallest_positive_epochs(self) -> int:
        """The smallest epochs on the map above 0 (the largest when there is none)."""
        return next((e for e in self.epochs if e > 0), self.largest_epochs)

    # --- JSON ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "rates": list(self.rates),
            "epochs": list(self.epochs),
            "mean": _cells_to_json(self.mean),
            "worst": _cells_to_json(self.worst),
            "baseline": self.baseline,
            "samples": self.samples,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ResilienceMap:
        return cls(
            tuple(d["rates"]),
            tuple(d["epochs"]),
            np.array(d["mean"], dtype=float),  # None (not measured) reads as NaN
            np.array(d["worst"], dtype=float),
            float(d["baseline"]),
            int(d.get("samples", 1)),
            dict(d.get("meta", {})),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> ResilienceMap:
        return cls.from_dict(json.loads(text))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ResilienceMap):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    # --- plot ---------------------------------------------------------------------
    def plot(self, path: str | Path, constraint: AccuracyConstraint | None = None, *, title: str | None = None) -> Path:
        """Write a PNG heat map of the worst-case accuracy (epochs x rates) with the constraint's contour.

        Uses matplotlib's Agg canvas directly (no pyplot, no global backend change).
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(1.2 + 0.9 * len(self.rates), 1.2 + 0.6 * len(self.epochs)))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        data = self.worst.T  # rows: epochs, cols: rates
        im = ax.imshow(data, origin="lower", aspect="auto", cmap="viridis", vmin=0.0, vmax=max(1e-9, self.baseline))
        for j in range(len(self.epochs)):
            for i in range(len(self.rates)):
                text, color = ("-", "0.4") if np.isnan(data[j, i]) else (f"{data[j, i]:.2f}", "w")
                ax.text(i, j, text, ha="center", va="center", fontsize=7, color=color)
        if constraint is not None and len(self.rates) > 1 and len(self.epochs) > 1:
            thr = constraint.threshold(self.baseline)
            if np.nanmin(data) < thr < np.nanmax(data):
                grid = (np.arange(len(self.rates)), np.arange(len(self.epochs)))
                ax.contour(*grid, np.ma.masked_invalid(data), levels=[thr], colors="r")
            ax.set_title(title or f"worst accuracy; red: {constraint} (={thr:.3f})", fontsize=8)
        else:
            ax.set_title(title or "worst accuracy", fontsize=8)
        ax.set_xticks(range(len(self.rates)), [f"{r:.3g}" for r in self.rates], fontsize=7)
        ax.set_yticks(range(len(self.epochs)), [str(e) for e in self.epochs], fontsize=7)
        ax.set_xlabel("fault rate (faulty-PE fraction)")
        ax.set_ylabel("retraining epochs")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out, format="png", dpi=100)
        return out
