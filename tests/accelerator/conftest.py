"""Shared helpers for the accelerator tests: random fault maps and a per-cycle array."""

from __future__ import annotations

import random

import pytest

from accelerator.faults import SITES, ArrayConfig, Fault, FaultMap


def random_fault_map(array: ArrayConfig, n: int, rng: random.Random, sites: tuple[str, ...] = SITES) -> FaultMap:
    """Up to n random faults (bits 0, top or any; stuck 0/1); dead PEs only with bypass."""
    faults: dict[tuple[int, int, str, int | None], Fault] = {}
    sites = tuple(s for s in sites if s != "pe" or array.bypass)
    for _ in range(n):
        site = rng.choice(sites)
        r, c = rng.randrange(array.rows), rng.randrange(array.cols)
        if site == "pe":
            f = Fault(r, c, "pe")
        else:
            w = array.bit_width(site)
            f = Fault(r, c, site, rng.choice([0, w - 1, rng.randrange(w)]), rng.randrange(2))
        faults[f.key] = f
    return FaultMap(array, tuple(faults.values()))


@pytest.fixture
def rng() -> random.Random:
    return random.Random(1234)
