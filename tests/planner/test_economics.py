"""planner.economics: when the robust base, its next rung and a measured map pay."""

from __future__ import annotations

import pytest

from planner.economics import (
    fap_t_epochs_at_least,
    resilience_map_pays,
    robust_base_pays,
    robust_rung_pays,
)


def test_a_robust_rung_pays_only_while_its_predicted_saving_covers_its_epochs() -> None:
    assert robust_rung_pays(7, 8, 3, saved_per_chip=1)  # the last rung added 7 chips; 8 still fail; 3 more epochs
    assert robust_rung_pays(4, 4, 4, saved_per_chip=1)
    assert not robust_rung_pays(7, 1, 4, saved_per_chip=1)  # one chip left cannot repay four epochs
    assert not robust_rung_pays(2, 50, 3, saved_per_chip=1)  # returns diminish: no more than the last rung added
    assert not robust_rung_pays(5, 5, 0, saved_per_chip=1)  # a rung of no epochs is not a rung
    # a quarter-pass first rung: each chip served saves a quarter epoch
    assert robust_rung_pays(12, 20, 3, saved_per_chip=0.25) and not robust_rung_pays(11, 20, 3, saved_per_chip=0.25)
    with pytest.raises(ValueError, match="saved_per_chip"):
        robust_rung_pays(1, 1, 1, saved_per_chip=0)


def test_the_first_rung_and_the_map_weigh_one_time_cost_against_group_epochs() -> None:
    assert not robust_base_pays(0, max_group_size=5, robust_epochs=3)
    assert robust_base_pays(40, max_group_size=5, robust_epochs=3)  # 0.4 x 2 x 8 groups = 6.4 > 3
    assert resilience_map_pays(1000, max_group_size=5, map_epochs=80)
    assert not resilience_map_pays(30, max_group_size=5, map_epochs=80)
    assert fap_t_epochs_at_least(12) == 12 and fap_t_epochs_at_least(3, 2) == 6


@pytest.mark.parametrize("bad", [-1, 1.5])
def test_counts_are_validated(bad: float) -> None:
    with pytest.raises(ValueError, match="must be a count"):
        robust_rung_pays(bad, 3, 1, saved_per_chip=1)  # type: ignore[arg-type]
