"""Verification decisions: escalate chips that missed the constraint, until verified or unrecoverable.

The escalation ladder of a chip that missed after its group's retraining:

0. more epochs together: the members of a group (of two or more, trained from the
   base model) that missed go on training together from that group's model, up to the
   next larger epochs on the map: only the extra epochs are trained. Merged maps tend
   to miss narrowly, and a few more epochs on the model that is almost there cost less
   than starting smaller groups over;
1. smaller group: from a group of more than two chips, the members that missed are
   re-packed (same reward rule) into groups of at most half the old size;
2. alone: from a group of two (or a smaller group), alone, continuing that group's
   model on its own map for the map's smallest positive epochs: that model is already
   fit to a superset of the chip's faults, so this usually takes fewer epochs than
   starting over alone from the base model;
3. more epochs: alone, continuing from its own last model up to the next larger
   epochs on the resilience map, up to the largest (skipped for a chip the map places
   beyond its largest epochs, which goes straight to 4 after its first, protected try);
4. protection: alone, from the base model, the map's largest epochs, and its most sensitive
   layer runs fault-free (3x that layer's cycles);
5. unrecoverable: only after step 4 missed too; the reason and the best accuracy
   reached are recorded.

That is the "full" climb (`PlanSettings.climb`, FAP+T's). The "bounded" climb differs in
two places, both for chips alone: a climb (step 3, or step 4's) stops early once its own
validation accuracies predict it cannot reach the constraint (`climb_cannot_reach`: even
its best gain per doubling of epochs so far, kept up to the largest epochs, falls short),
and protection (step 4) climbs the map's epochs from the smallest, warm, as step 3 does.
A chip no climb can help then costs a few rungs instead of twice the largest epochs.

Every step moves a chip strictly up this ladder (group size down, epochs up,
protection on), so replanning terminates after at most
1 + log2(max_group_size) + 1 + len(resilience_map.epochs) + 1 rounds, and the "bounded"
climb after len(resilience_map.epochs) more (protection's own climb).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

from planner.constraint import meets
from planner.plan import UNRECOVERABLE, VERIFIED, ChipState, Group, Plan, group_chips, make_group

# Validation accuracies are estimates (one standard error is about a point on 500 images at
# 95%): a climb is stopped only when its optimistic forecast misses by more than this.
CLIMB_NOISE = 0.01
# ... and only once at most this many doublings of epochs are left: gains do not always
# diminish (on harsh fleet 1604 a chip FAP+T verified gained 0, 1 and 2.8 points over its
# three doublings to 8 passes), so a forecast from the first quarter passes is not trusted.
CLIMB_FORECAST_DOUBLINGS = 2.0

_Step = tuple[
    list[str], float, int, str, bool, str | None, int
]  # members, rate, epochs, reason, protect, warm_from, start_epoch


def climb_cannot_reach(
    climb: Sequence[tuple[int, float]], largest_epochs: int, threshold: float, *, noise: float = CLIMB_NOISE
) -> bool:
    """Whether a chip's climb so far predicts that no rung up to `largest_epochs` meets `threshold`.

    `climb`: (total epochs, validation accuracy as a fraction) of its tries on one model,
    epochs increasing. The forecast is optimistic: its best accuracy plus, for every doubling
    of epochs still left, the best gain per doubling seen between two tries (returns usually
    diminish), plus `noise`. Needs three tries (two gains) and at most `CLIMB_FORECAST_DOUBLINGS`
    doublings left to the top; before that a climb is never stopped.
    """
    if any(t1 <= t0 or t0 <= 0 for (t0, _), (t1, _) in zip(climb, climb[1:], strict=False)):
        raise ValueError(f"climb_cannot_reach: epochs must be positive and increasing, got {list(climb)}")
    if len(climb) < 3:
        return False
    doublings_left = max(0.0, math.log2(largest_epochs / climb[-1][0]))
    if doublings_left > CLIMB_FORECAST_DOUBLINGS:
        return False
    gains = [(a1 - a0) / math.log2(t1 / t0) for (t0, a0), (t1, a1) in zip(climb, climb[1:], strict=False)]
    forecast = max(a for _, a in climb) + doublings_left * max(0.0, *gains) + noise
    return not meets(forecast, threshold)


def _climbs(state: ChipState) -> list[list[dict[str, Any]]]:
    """The chip's tries cut into climbs: a climb goes on while the protection stays the same
    and the epochs grow (each try continuing the last); anything else starts a new one."""
    climbs: list[list[dict[str, Any]]] = []
    for h in state.history:
        last = climbs[-1][-1] if climbs else None
        if last is not None and h["protect"] == last["protect"] and h["total_epochs"] > last["total_epochs"]:
            climbs[-1].append(h)
        else:
            climbs.append([h])
    return climbs


def training_collapsed(state: ChipState, drop: float = 0.2) -> bool:
    """Whether, within one climb (tries with the same protection and growing epochs, each
    continuing the last), a try of the chip fell more than `drop` (a fraction) below an earlier
    one: its retraining diverged rather than converged (stuck high partial-sum bits blow some
    runs up; bench/README.md, fleet economics)."""
    if not 0.0 < drop <= 1.0:
        raise ValueError(f"training_collapsed: drop {drop!r} must be in (0, 1]")
    for climb in _climbs(state):
        best = float(climb[0]["accuracy"])
        for h in climb[1:]:
            if float(h["accuracy"]) < best - drop:
                return True
            best = max(best, float(h["accuracy"]))
    return False


def _climb(state: ChipState, protect: bool) -> list[tuple[int, float]]:
    """The chip's current climb, if it is one with `protect`: its latest tries alone, one model warm."""
    climbs = _climbs(state)
    if not climbs or climbs[-1][0]["protect"] != protect:
        return []
    tries: list[tuple[int, float]] = []
    for h in reversed(climbs[-1]):
        if h["size"] != 1:
            break
        tries.append((int(h["total_epochs"]), float(h["accuracy"])))
    return tries[::-1]


def _next_step(plan: Plan, group: Group, chip_id: str) -> _Step | None:
    """For a chip that missed alone in `group`: its next try, None when the ladder is exhausted.

    A chip the map places beyond its largest epochs (own `epochs` None) skips the larger
    epochs, which the map already predicts to fail, and goes straight to protection (at the
    top, or in the "bounded" climb climbing on from its first, protected try).
    """
    rmap = plan.resilience_map
    state = plan.chips[chip_id]
    rate = state.effective_rate
    bounded = plan.settings.climb == "bounded"
    # "full" protects at the largest epochs in one go; "bounded" climbs there from the smallest
    protect = ([chip_id], rate, rmap.smallest_positive_epochs if bounded else rmap.largest_epochs, "protect", True)
    at_top = group.protect and group.total_epochs >= rmap.largest_epochs
    # "full" restarts protected at the top; "bounded" goes on climbing a protected try
    if state.epochs is None and not (group.protect if bounded else at_top):
        return (*protect, None, 0)
    nxt = rmap.next_epochs(group.total_epochs)
    hopeless = bounded and climb_cannot_reach(_climb(state, group.protect), rmap.largest_epochs, plan.threshold)
    if nxt is not None and not hopeless:  # continue its own model: only the extra epochs
        done = group.total_epochs
        return ([chip_id], rate, nxt - done, "more_epochs", group.protect, group.group_id, done)
    if not group.protect:
        return (*protect, None, 0)
    return None


def _alone(plan: Plan, group: Group, chip_id: str) -> _Step:
    """A member that missed in `group` goes on alone from the group's model (ladder step 2)."""
    epochs = plan.resilience_map.smallest_positive_epochs
    rate = plan.chips[chip_id].effective_rate
    return ([chip_id], rate, epochs, "alone", group.protect, group.group_id, group.total_epochs)


def replan(plan: Plan, verification: Mapping[str, float]) -> Plan:
    """A new plan after verifying the pending groups.

    `verification`: chip id -> accuracy (fraction) of its group's retrained model on
    the chip's own fault map, for every member of every pending group (ValueError
    otherwise). Chips that meet the constraint become verified; the others move up
    the ladder (module doc) into new pending groups of the next round, or are declared
    unrecoverable. The input plan is not modified.
    """
    new = copy.deepcopy(plan)
    rnd = plan.round + 1
    thr = new.threshold
    settings = new.settings
    new_groups: list[_Step] = []
    for g in new.pending_groups:
        missing = [c for c in g.members if c not in verification]
        if missing:
            raise ValueError(f"replan: no verification for chip(s) {missing} of group {g.group_id}")
        g.status = "done"
        failed = []
        for c in g.members:
            acc = float(verification[c])
            st = new.chips[c]
            st.history.append(
                {
                    "group_id": g.group_id,
                    "epochs": g.epochs,
                    "total_epochs": g.total_epochs,
                    "protect": g.protect,
                    "size": len(g.members),
                    "accuracy": acc,
                }
            )
            st.best_accuracy = acc if st.best_accuracy is None else max(st.best_accuracy, acc)
            if meets(acc, thr):
                st.status, st.accuracy, st.group_id = VERIFIED, acc, g.group_id
            else:
                st.accuracy = acc
                failed.append(c)
        if not failed:
            continue
        size = len(g.members)
        together = new.resilience_map.next_epochs(g.total_epochs) if size > 1 and g.warm_from is None else None
        if together is not None:
            done = g.total_epochs
            new_groups.append(
                (failed, g.effective_rate, together - done, "more_epochs_together", g.protect, g.group_id, done)
            )
        elif size > 2:
            limit = max(1, size // 2)
            for members, rate, epochs in group_chips(
                failed, new.maps, new.chips, new.resilience_map, new.constraint, new.severity, settings, limit
            ):
                if len(members) == 1:
                    new_groups.append(_alone(new, g, members[0]))
                else:
                    new_groups.append((members, rate, epochs, "smaller_group", False, None, 0))
        elif size == 2:
            new_groups.extend(_alone(new, g, c) for c in failed)
        else:
            c = failed[0]
            step = _next_step(new, g, c)
            if step is None:
                st = new.chips[c]
                st.status = UNRECOVERABLE
                top = new.resilience_map.largest_epochs
                how = "the largest on the map" if g.total_epochs >= top else f"its climb to {top} predicted to miss"
                st.reason = (
                    f"missed the constraint (accuracy {st.accuracy:.4f} < {thr:.4f}) after retraining alone for "
                    f"{g.total_epochs} epochs ({how}) with its most sensitive layer "
                    f"protected; best accuracy {st.best_accuracy:.4f}"
                )
                continue
            new_groups.append(step)
    new_groups.sort(key=lambda t: (-t[2], sorted(t[0])))
    for i, (members, rate, epochs, reason, protect, warm_from, start) in enumerate(new_groups):
        g = make_group(
            f"r{rnd}-g{i:06d}",
            members,
            new.maps,
            new.chips,
            epochs,
            rate,
            settings,
            round=rnd,
            reason=reason,
            protect=protect,
            warm_from=warm_from,
            start_epoch=start,
        )
        new.groups.append(g)
        for c in members:
            new.chips[c].group_id = g.group_id
    new.round = rnd
    return new
