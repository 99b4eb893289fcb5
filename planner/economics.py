"""When the fleet machinery pays: a fault-robust base model, a measured resilience map.

Each rule weighs a one-time cost in training epochs against the per-chip retraining it
is predicted to save, from counts the screening already has (chips that no library model
serves). Pure arithmetic with the constants stated where they were measured.
"""

from __future__ import annotations

# Share of the chips still failing after bypass that a fault-robust base serves with no
# retraining of their own: 12 -> 7 of 200 harsh chips after 3 epochs (DESIGN.md, lenet5 /
# mnist5k / 32x32).
ROBUST_FIX_FRACTION = 0.4
# Epochs a group of failing chips costs on the ladder, continuations included (a group of
# five mostly verifies after 1 or 2 epochs on the harsh fleets of bench/README.md).
GROUP_EPOCHS = 2.0
# A measured map must cost at most this share of the retraining it informs.
MAP_SHARE = 0.25


def _count(name: str, value: int) -> int:
    if int(value) != value or value < 0:
        raise ValueError(f"{name}: {value!r} must be a count >= 0")
    return int(value)


def predicted_group_epochs(n_failing: int, max_group_size: int) -> float:
    """Epochs grouped retraining of `n_failing` chips is predicted to cost (groups of
    `max_group_size`, `GROUP_EPOCHS` each)."""
    n = _count("n_failing", n_failing)
    size = _count("max_group_size", max_group_size)
    if size < 1:
        raise ValueError("max_group_size: must be >= 1")
    return GROUP_EPOCHS * -(-n // size)


def robust_base_pays(n_failing: int, *, max_group_size: int, robust_epochs: int) -> bool:
    """Whether training a robust base for `robust_epochs` epochs is predicted to cost less
    than the grouped retraining it saves (`ROBUST_FIX_FRACTION` of `n_failing` chips)."""
    saving = ROBUST_FIX_FRACTION * predicted_group_epochs(n_failing, max_group_size)
    return saving > _count("robust_epochs", robust_epochs)


def robust_rung_pays(
    served_by_last_rung: int, still_failing: int, next_rung_epochs: int, *, saved_per_chip: float
) -> bool:
    """Whether continuing the robust base's training for `next_rung_epochs` more epochs is
    predicted to pay, from what its last rung measured: the next rung is predicted to serve
    no more chips than the last one added (returns diminish) and no more than are still
    failing, each saving `saved_per_chip` epochs (the first rung of the retraining ladder,
    in full passes, which a chip still failing would otherwise train at least)."""
    if not saved_per_chip > 0:
        raise ValueError(f"saved_per_chip: {saved_per_chip!r} must be > 0")
    gain = min(_count("served_by_last_rung", served_by_last_rung), _count("still_failing", still_failing))
    return gain * saved_per_chip >= _count("next_rung_epochs", next_rung_epochs) > 0


def resilience_map_pays(n_failing: int, *, max_group_size: int, map_epochs: int) -> bool:
    """Whether a measured map of `map_epochs` cell epochs costs at most `MAP_SHARE` of the
    grouped retraining of `n_failing` chips. Without one the planner climbs the epochs
    ladder by verification (`ResilienceMap.ladder`), warm, so a map saves verification
    rounds and passes, never epochs: it is worth its cost only on very large batches."""
    return _count("map_epochs", map_epochs) <= MAP_SHARE * predicted_group_epochs(n_failing, max_group_size)


def fap_t_epochs_at_least(n_failing: int, smallest_epochs: int = 1) -> int:
    """A lower bound on what FAP+T spends: each chip still failing after bypass trains at
    least the ladder's first rung (`smallest_epochs`), alone."""
    return _count("n_failing", n_failing) * _count("smallest_epochs", smallest_epochs)
