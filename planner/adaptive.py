"""Which cells of a resilience map a fleet's retraining epochs depend on (the pure half of
`workers.adaptive_map`).

A full eFAT map trains every sampled map of every grid rate to the largest epochs. The
retraining epochs `planner.plan_fleet` gives a fleet read only a few of those cells: each chip that
fails screening sits at one rate (`plan_fleet`'s placement, which reads the 0-epoch
column alone), between two grid rates, and its epochs are the first rung of the ladder at
which the map's conservative accuracy there meets the constraint
(`ResilienceMap.required_epochs`). So a grid rate needs training only while a chip that
reads it is still undecided, and only up to that chip's rung: the contour of the
constraint, at the rates the fleet has.

`MapClimb` is that decision, rung by rung: the caller measures the 0-epoch column for
every rate (inference only), places the chips, then for each rung trains (warm: each rung
continues the last, so a sampled map that reaches E epochs has cost E) and measures the
sampled maps `next_measurement` names, one at a time, until it names none. A rate is
trained only while a chip that reads it is undecided, and a sample only while its
accuracy could still let such a chip meet the constraint at that rung.

The map it leaves (`resilience_map`) has NaN ("not measured") in every other cell; a chip's
epochs read off it are the ones the climb decided, and equal the ones read off the full
grid (the same cells from the same sampled maps and training) whenever the full grid's
running minimum over rates at that chip's cells comes from rates measured there (always,
when the grid's accuracy falls with the rate).

Accuracies are top-1 fractions in [0, 1]; rates faulty-PE fractions; rungs epochs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from accelerator.faults import FaultMap
from planner.constraint import AccuracyConstraint, meets
from planner.plan import PLANNED, plan_fleet
from planner.resilience import ResilienceMap
from planner.severity import SiteSeverity


def rows_read(rates: Sequence[float], rate: float) -> tuple[int, ...]:
    """Indices of the grid rates whose cells `ResilienceMap.worst_at(rate, j)` interpolates.

    `rates`: the map's grid (ascending). Below the first grid rate the first row alone; at a
    grid rate that row alone; between two grid rates both; past the last (or not finite)
    none: the map gives no epochs there whatever is measured. The running minimum over
    rates also reads the rows below, where they were measured.
    """
    grid = np.asarray(rates, dtype=float)
    if not math.isfinite(rate) or rate > grid[-1] + 1e-12:
        return ()
    if rate <= grid[0]:
        return (0,)
    i = int(np.searchsorted(grid, rate, side="left"))  # first grid rate >= rate
    if i == len(grid) or grid[i] == rate:
        return (min(i, len(grid) - 1),)
    return (i - 1, i)


def placed_rates(
    rmap: ResilienceMap,
    chips: Sequence[FaultMap],
    screening: Mapping[str, float],
    constraint: AccuracyConstraint,
    *,
    bypass_screening: Mapping[str, Mapping[str, float]] | None = None,
    placement: str = "screening",
    severity: SiteSeverity | None = None,
    served_by: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """Chip id -> effective rate, for every chip `plan_fleet` would retrain on a map whose
    0-epoch column is `rmap`'s (its other cells do not move a placement).

    Reads `plan_fleet` itself (same bypass choice, same placement), so the rates are the
    ones the final plan uses. `inf` marks a chip placed past the map.
    """
    plan = plan_fleet(
        chips,
        screening,
        rmap,
        constraint,
        severity=severity,
        placement=placement,
        bypass_screening=bypass_screening,
        served_by=served_by,
        max_group_size=1,  # grouping plays no part in placement
    )
    return {cid: float(st.effective_rate) for cid, st in plan.chips.items() if st.status == PLANNED}


class MapClimb:
    """The adaptive map's state: accuracies measured so far, and the next one a decision needs.

    `acc[i, s, j]`: accuracy (fraction) of sampled map `s` of grid rate `rates[i]` after
    `epochs[j]` epochs, NaN where not measured; `reached[i, s]`: the rung that sampled map
    has been trained to. A cell (i, j) counts in the map only when every sample is measured.

    Protocol: `record(0, i, s, ...)` for every sampled map (the 0-epoch column, no
    training), `place(chip_rates)`, then for rung j = 1, 2, ...: while `next_measurement(j)`
    names a sampled map (i, s), train it warm from `reached[i, s]` to rung j, evaluate it
    there and `record(j, i, s, accuracy)`.

    Which one: a chip not decided yet is "met at rung j" only if the map's conservative
    accuracy at its rate meets the threshold, which needs every sample of the one or two
    rates it reads. An upper bound on that accuracy (samples not measured count 1.0; more
    measurements only lower it) rules a rung out without measuring the rest; so the climb
    measures, among the chips the bound leaves open, the sample most likely to rule the rung
    out for most of them (`next_measurement`). A chip is decided at the first rung its cells meet,
    or never (None) past the top, and that is what the map read afterwards gives: cells of
    rung j are never measured after the climb moves on (catching up trains, evaluates not).

    `max_undecided`: share (in [0, 1)) of the placed chips the climb may leave undecided. It
    stops, before training a rung, once no more than that many chips whose epochs the map
    could still give are undecided: they get none (their cells are not measured, so
    `plan_fleet` plans them alone past the map and `replan` climbs for them), and the
    rungs only they needed (the tail of the fleet, the most epochs) are not trained.
    0 (default): every chip decided as the full grid decides it.
    """

    def __init__(
        self,
        rates: Sequence[float],
        epochs: Sequence[int],
        samples: int,
        baseline: float,
        constraint: AccuracyConstraint,
        *,
        max_undecided: float = 0.0,
    ) -> None:
        self.rates = tuple(float(r) for r in rates)
        self.epochs = tuple(int(e) for e in epochs)
        if not self.rates or list(self.rates) != sorted(set(self.rates)) or self.rates[0] < 0:
            raise ValueError(f"MapClimb: rates must be ascending, distinct and >= 0, got {self.rates}")
        if list(self.epochs) != sorted(set(self.epochs)) or self.epochs[0] != 0 or len(self.epochs) < 2:
            raise ValueError(f"MapClimb: epochs must ascend from 0 to a positive count, got {self.epochs}")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"MapClimb: samples must be an int >= 1, got {samples!r}")
        if not isinstance(constraint, AccuracyConstraint):
            raise TypeError(f"MapClimb: constraint must be an AccuracyConstraint, got {type(constraint).__name__}")
        if isinstance(max_undecided, bool) or not isinstance(max_undecided, int | float):
            raise ValueError(f"MapClimb: max_undecided must be a share in [0, 1), got {max_undecided!r}")
        if not 0.0 <= float(max_undecided) < 1.0:
            raise ValueError(f"MapClimb: max_undecided must be a share in [0, 1), got {max_undecided!r}")
        self.samples, self.baseline, self.constraint = samples, float(baseline), constraint
        self.max_undecided = float(max_undecided)
        self.threshold = constraint.threshold(self.baseline)
        self.acc = np.full((len(self.rates), samples, len(self.epochs)), np.nan)
        self.reached = np.zeros((len(self.rates), samples), dtype=np.int64)
        self.chip_rates: dict[str, float] | None = None
        self._rung = 0  # the rung being measured: cells below it are final

    # --- measurements ---------------------------------------------------------------
    def record(self, rung: int, row: int, sample: int, accuracy: float) -> None:
        """Accuracy of sampled map `sample` of `rates[row]` trained (warm) to `epochs[rung]`."""
        if not (isinstance(accuracy, int | float | np.floating) and 0.0 <= float(accuracy) <= 1.0):
            raise ValueError(f"MapClimb.record: accuracy must be a fraction, got {accuracy!r}")
        if rung < self._rung or rung < self.reached[row, sample] or not np.isnan(self.acc[row, sample, rung]):
            raise ValueError(
                f"MapClimb.record: rung {rung} of rate {self.rates[row]} sample {sample} is past (warm climb)"
            )
        if rung > 0 and self.chip_rates is None:
            raise ValueError("MapClimb.record: place the chips before training")
        self.acc[row, sample, rung] = float(accuracy)
        self.reached[row, sample] = rung
        self._rung = rung

    def _cells(self) -> tuple[np.ndarray, np.ndarray]:
        measured = ~np.isnan(self.acc).any(axis=1)
        safe = np.where(np.isnan(self.acc), 0.0, self.acc)
        return np.where(measured, safe.mean(axis=1), np.nan), np.where(measured, safe.min(axis=1), np.nan)

    def resilience_map(self, meta: Mapping[str, Any] | None = None) -> ResilienceMap:
        """The map measured so far: mean and worst over samples, NaN where a sample is missing.
        `meta["cell_epochs"]` is its training cost (`ResilienceMap.training_epochs`)."""
        mean, worst = self._cells()
        info = {**(meta or {}), "kind": "adaptive", "cell_epochs": self.cell_epochs}
        return ResilienceMap(self.rates, self.epochs, mean, worst, self.baseline, self.samples, info)

    # --- decisions ----------------------------------------------------------------------
    def place(self, chip_rates: Mapping[str, float]) -> None:
        """The effective rates of the chips to retrain (`placed_rates`), once the 0-epoch
        column is recorded."""
        if np.isnan(self.acc[:, :, 0]).any():
            raise ValueError("MapClimb.place: record the 0-epoch column of every rate first")
        self.chip_rates = {str(c): float(r) for c, r in chip_rates.items()}

    def chip_epochs(self) -> dict[str, int | None]:
        """Each placed chip's retraining epochs read off the map so far (None: not decided yet, or never:
        past the map, or no rung met)."""
        if self.chip_rates is None:
            raise ValueError("MapClimb.chip_epochs: place the chips first")
        ids = list(self.chip_rates)
        need = self.resilience_map().required_epochs_array(np.array([self.chip_rates[c] for c in ids]), self.constraint)
        return {c: (None if a < 0 else int(a)) for c, a in zip(ids, need, strict=True)}

    def _upper_bound(
        self, rate: float, rows: tuple[int, ...], rung: int, worst: np.ndarray, guess: tuple[int, float] | None = None
    ) -> float:
        """Largest accuracy the map can still give `rate` at `rung`, whatever is measured next
        (`guess`: as if row `guess[0]` had a sample measured at `guess[1]`)."""
        column = worst[:, rung]
        bounds = []
        for k in rows:
            seen = self.acc[k, :, rung]
            ub = float(np.nanmin(seen)) if not np.isnan(seen).all() else 1.0
            if guess is not None and guess[0] == k:
                ub = min(ub, guess[1])
            below = column[:k][~np.isnan(column[:k])]  # the running minimum over measured rates
            bounds.append(min(ub, float(below.min())) if len(below) else ub)
        if len(rows) == 1:
            return bounds[0]
        lo, hi = self.rates[rows[0]], self.rates[rows[1]]
        w = (rate - lo) / (hi - lo)
        return (1 - w) * bounds[0] + w * bounds[1]

    def next_measurement(self, rung: int) -> tuple[int, int] | None:
        """The sampled map (row, sample) to train to `epochs[rung]` and measure next, or None
        when every chip is decided at this rung (met, or certainly not met).

        Among the samples open chips still need, the one whose accuracy last seen, if it held
        at this rung, would rule the rung out for the most open chips; then the lowest one.
        """
        if self.chip_rates is None:
            raise ValueError("MapClimb.next_measurement: place the chips first")
        if not 1 <= rung < len(self.epochs) or rung < self._rung:
            return None
        _, worst = self._cells()
        chip_epochs = self.chip_epochs()
        undecided = [c for c, e in chip_epochs.items() if e is None and rows_read(self.rates, self.chip_rates[c])]
        if len(undecided) <= math.floor(self.max_undecided * len(chip_epochs) + 1e-9):
            return None  # the tail left undecided: no rung from here on is trained
        open_chips = []
        for cid in undecided:
            rate = self.chip_rates[cid]
            rows = rows_read(self.rates, rate)
            if any(np.isnan(self.acc[k, :, rung]).any() for k in rows) and meets(
                self._upper_bound(rate, rows, rung, worst), self.threshold
            ):
                open_chips.append((rate, rows))
        best: tuple[int, float, int, int] | None = None
        for k in sorted({k for _, rows in open_chips for k in rows}):
            for s in range(self.samples):
                if not np.isnan(self.acc[k, s, rung]):
                    continue
                guess = float(self.acc[k, s, self.reached[k, s]])
                ruled_out = sum(
                    1
                    for rate, rows in open_chips
                    if k in rows and not meets(self._upper_bound(rate, rows, rung, worst, (k, guess)), self.threshold)
                )
                key = (-ruled_out, guess, -k, s)
                if best is None or key < best:
                    best = key
        return None if best is None else (-best[2], best[3])

    @property
    def depth(self) -> tuple[int, ...]:
        """Per grid rate, the largest epochs any of its sampled maps was trained to."""
        return tuple(self.epochs[int(r.max())] for r in self.reached)

    @property
    def cell_epochs(self) -> int:
        """Epochs trained: each sampled map trained warm to the epochs it reached."""
        return int(sum(self.epochs[int(r)] for r in self.reached.ravel()))

    @property
    def cell_evaluations(self) -> int:
        """Sampled maps evaluated, each one pass over the evaluation split (0 epochs included)."""
        return int((~np.isnan(self.acc)).sum())
