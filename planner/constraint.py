"""The user's accuracy constraint: absolute floor or bounded drop below the baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

# Accuracies are fractions of a test split (k / n, n far below 1e9): the tolerance absorbs the float
# rounding of `baseline - max_drop` and is never as large as one sample.
TOLERANCE = 1e-9


def meets(accuracy: float, threshold: float) -> bool:
    """Whether `accuracy` meets the constraint whose lowest acceptable accuracy is `threshold`
    (`AccuracyConstraint.threshold`). The one definition: every such comparison goes through here
    or `meets_each`."""
    return float(accuracy) >= float(threshold) - TOLERANCE


def meets_each(accuracies: npt.ArrayLike, threshold: float) -> npt.NDArray[np.bool_]:
    """`meets` element-wise."""
    return np.asarray(accuracies, dtype=float) >= float(threshold) - TOLERANCE


@dataclass(frozen=True)
class AccuracyConstraint:
    """What "meets the constraint" means for one chip.

    Accuracies are top-1 fractions in [0, 1]. Exactly one of
    - `min_accuracy`: absolute, e.g. 0.97 (a chip must reach at least 97 %), or
    - `max_drop`: relative, e.g. 0.01 (at most 1 point below the fault-free baseline)
    is set.
    """

    min_accuracy: float | None = None
    max_drop: float | None = None

    def __post_init__(self) -> None:
        if (self.min_accuracy is None) == (self.max_drop is None):
            raise ValueError("constraint: set exactly one of min_accuracy and max_drop")
        value = self.min_accuracy if self.min_accuracy is not None else self.max_drop
        assert value is not None
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"constraint: {value!r} must be an accuracy fraction in [0, 1]")

    @classmethod
    def absolute(cls, min_accuracy: float) -> AccuracyConstraint:
        return cls(min_accuracy=float(min_accuracy))

    @classmethod
    def relative(cls, max_drop: float) -> AccuracyConstraint:
        return cls(max_drop=float(max_drop))

    @classmethod
    def parse(cls, text: str | float) -> AccuracyConstraint:
        """CLI form: a value below 0.5 is a relative drop (``0.01``), otherwise a floor (``0.97``).

        Prefixes force the kind: ``drop:0.01`` or ``min:0.97``.
        """
        s = str(text).strip()
        if s.startswith("drop:"):
            return cls.relative(float(s[5:]))
        if s.startswith("min:"):
            return cls.absolute(float(s[4:]))
        v = float(s)
        return cls.relative(v) if v < 0.5 else cls.absolute(v)

    def threshold(self, baseline: float) -> float:
        """Lowest accuracy (fraction) that meets the constraint, given the fault-free baseline."""
        if self.min_accuracy is not None:
            return float(self.min_accuracy)
        assert self.max_drop is not None
        return float(baseline) - float(self.max_drop)

    def met(self, accuracy: float, baseline: float) -> bool:
        """Whether `accuracy` meets this constraint, given the fault-free `baseline` (`meets`)."""
        return meets(accuracy, self.threshold(baseline))

    def to_dict(self) -> dict[str, Any]:
        if self.min_accuracy is not None:
            return {"min_accuracy": self.min_accuracy}
        return {"max_drop": self.max_drop}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AccuracyConstraint:
        return cls(min_accuracy=d.get("min_accuracy"), max_drop=d.get("max_drop"))

    def __str__(self) -> str:
        if self.min_accuracy is not None:
            return f">= {self.min_accuracy:.4f}"
        return f"<= {self.max_drop:.4f} below baseline"
