"""Fast, fake accuracy measurements for the planner's unit tests."""

from __future__ import annotations

from typing import Any

import numpy as np

BASELINE = 0.99


def smooth_accuracy(rate: float, epochs: int, noise: float = 0.0) -> float:
    """Accuracy (fraction) of a 0.99 model at faulty-PE fraction `rate` after `epochs` epochs."""
    return BASELINE - min(0.89, 1.5 * rate / (1 + epochs) ** 1.5) - noise


def fake_measure_cell(task: Any) -> list[float]:
    rng = np.random.default_rng(task.seed)
    return [smooth_accuracy(task.rate, e, 0.004 * rng.random()) for e in task.epochs]
