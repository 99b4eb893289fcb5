"""Verification decisions: escalate chips that missed the constraint, until verified or unrecoverable.

The escalation ladder of a chip that missed after its group's retraining:

1. smaller group: from a group of more than two chips, the members that missed are
   re-packed (same reward rule) into groups of at most half the old size;
2. alone: from a group of two (or a smaller group), retrained alone, at no less than
   the amount that just failed;
3. more epochs: alone, the next larger amount on the resilience map, up to the largest
   (skipped for a chip the map places beyond every amount, which goes straight to 4
   after its first, protected try);
4. protection: alone, the largest amount, and its most sensitive layer runs fault-free
   (3x that layer's cycles);
5. unrecoverable: only after step 4 missed too; the reason and the best accuracy
   reached are recorded.

Every step moves a chip strictly up this ladder (group size down, amount up,
protection on), so replanning terminates after at most
log2(max_group_size) + 1 + len(amounts) + 1 rounds.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

from planner.plan import UNRECOVERABLE, VERIFIED, Group, Plan, group_chips, make_group


def _next_step(plan: Plan, group: Group, chip_id: str) -> tuple[str, int, bool] | None:
    """For a chip that missed alone in `group`: (reason, amount, protect) of its next try, None when exhausted.

    A chip the map places beyond every amount (own amount None) skips the larger
    amounts, which the map already predicts to fail, and goes straight to the top rung.
    """
    rmap = plan.resilience_map
    at_top = group.protect and group.amount >= rmap.largest_amount
    if plan.chips[chip_id].amount is None and not at_top:
        return ("protect", rmap.largest_amount, True)
    nxt = rmap.next_amount(group.amount)
    if nxt is not None:
        return ("more_epochs", nxt, group.protect)
    if not group.protect:
        return ("protect", rmap.largest_amount, True)
    return None


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
    new_groups: list[tuple[list[str], float, int, str, bool]] = []
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
                    "amount": g.amount,
                    "protect": g.protect,
                    "size": len(g.members),
                    "accuracy": acc,
                }
            )
            st.best_accuracy = acc if st.best_accuracy is None else max(st.best_accuracy, acc)
            if acc >= thr - 1e-12:
                st.status, st.accuracy, st.group_id = VERIFIED, acc, g.group_id
            else:
                st.accuracy = acc
                failed.append(c)
        if not failed:
            continue
        size = len(g.members)
        if size > 2:
            limit = max(1, size // 2)
            for members, rate, amount in group_chips(
                failed, new.maps, new.chips, new.resilience_map, new.constraint, new.severity, settings, limit
            ):
                amount = max(amount, g.amount) if len(members) == 1 else amount
                new_groups.append((members, rate, amount, "smaller_group" if len(members) > 1 else "alone", False))
        elif size == 2:
            for c in failed:
                own = new.chips[c].amount or g.amount
                new_groups.append(([c], new.chips[c].effective_rate, max(own, g.amount), "alone", False))
        else:
            c = failed[0]
            step = _next_step(new, g, c)
            if step is None:
                st = new.chips[c]
                st.status = UNRECOVERABLE
                st.reason = (
                    f"missed the constraint (accuracy {st.accuracy:.4f} < {thr:.4f}) after retraining alone for "
                    f"the largest amount on the map ({g.amount} epochs) with its most sensitive layer protected; "
                    f"best accuracy {st.best_accuracy:.4f}"
                )
                continue
            reason, amount, protect = step
            new_groups.append(([c], new.chips[c].effective_rate, amount, reason, protect))
    new_groups.sort(key=lambda t: (-t[2], sorted(t[0])))
    for i, (members, rate, amount, reason, protect) in enumerate(new_groups):
        g = make_group(
            f"r{rnd}-g{i:06d}",
            members,
            new.maps,
            new.chips,
            amount,
            rate,
            settings,
            round=rnd,
            reason=reason,
            protect=protect,
        )
        new.groups.append(g)
        for c in members:
            new.chips[c].group_id = g.group_id
    new.round = rnd
    return new
