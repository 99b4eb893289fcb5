"""Fast fake measurements for the planner's unit tests (a pure library: no emulator needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The editable install may register `planner` as a namespace package; under pytest's
# importlib mode the checkout root is then not on sys.path. Put it first.
ROOT = str(Path(__file__).resolve().parents[2])
if sys.path[:1] != [ROOT]:
    sys.path.insert(0, ROOT)
for _name in [m for m in sys.modules if m == "planner" or m.startswith("planner.")]:
    if getattr(sys.modules[_name], "__file__", None) is None:
        del sys.modules[_name]

from accelerator.faults import ArrayConfig  # noqa: E402
from planner import AccuracyConstraint, ResilienceMap  # noqa: E402
from tests.planner.fakes import BASELINE, fake_measure_cell  # noqa: E402


@pytest.fixture
def array() -> ArrayConfig:
    return ArrayConfig(16, 16)


@pytest.fixture
def rmap() -> ResilienceMap:
    return ResilienceMap.build(
        [0.01, 0.02, 0.04, 0.08, 0.16, 0.32], [0, 1, 2, 4, 8], 3, fake_measure_cell, baseline=BASELINE, seed=0
    )


@pytest.fixture
def constraint() -> AccuracyConstraint:
    return AccuracyConstraint.relative(0.01)
