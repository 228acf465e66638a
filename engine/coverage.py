"""The load-time check of a rule set: every combination fired through durable-rules.

:class:`engine.classify.Engine` runs it when it is built (and ``clm-stratify rules
validate``): each factor's rules must give exactly its state for every state and every
kind of bound, and the group and status rules exactly one rule for every combination of
fact states.
"""

from __future__ import annotations

import itertools
from decimal import Decimal
from typing import TYPE_CHECKING

from engine.compile import FEATURES_KIND, STATES_KIND, post_value, representative_value
from engine.ruleset import FACTOR_STATES

if TYPE_CHECKING:  # pragma: no cover
    from engine.classify import Engine


class RulesetInconsistentError(RuntimeError):
    """The rule set did not produce exactly one group / status / factor state."""


def check_coverage(engine: "Engine") -> int:
    """Fire every combination of states through durable_rules: each factor's rules
    must give exactly its state, and the group and status rules exactly one rule
    for every combination of fact states. Returns the number of combinations."""
    rs = engine.ruleset
    fids = list(rs.factors)
    for states in itertools.product(FACTOR_STATES, repeat=len(fids)):
        fact: dict[str, object] = {"kind": FEATURES_KIND}
        for fid, state in zip(fids, states):
            post_value(fact, rs.factors[fid].feature, representative_value(rs, fid, state))
        fired = engine._factors.fire(fact)
        expected = sorted(f"factor.{fid}.{state}" for fid, state in zip(fids, states))
        if sorted(fired) != expected:
            raise RulesetInconsistentError(
                f"rule set {rs.id} {rs.version}: factor rules fired {sorted(fired)} for {fact}, "
                f"expected {expected}")
    # A lower bound at the threshold proves a ">=" factor; below it, it decides nothing.
    # An upper bound below the threshold (or at it, when the bound is excluded) proves
    # it absent; above it, nothing. (Mirrored for "<=" / "<" factors.)
    for fid, factor in rs.factors.items():
        if factor.operator == "is_true":
            continue
        upward = factor.operator in (">=", ">")
        t = factor.threshold
        step = Decimal(1) if factor.feature == "tumour_count" else Decimal("0.1")
        cases = [  # (lower bound, upper bound, upper strict, expected state)
            (representative_value(rs, fid, "present"), None, False, "present" if upward else "unknown"),
            (representative_value(rs, fid, "absent"), None, False, "unknown" if upward else "absent"),
            (None, t, True, "absent" if upward else "present"),
            (None, t + step, True, "unknown"),
            (None, t - step, False, "absent" if upward else "present"),
            (None, t + step, False, "unknown"),
        ]
        if factor.feature == "tumour_count":
            cases = [c for c in cases if c[1] is None]
        for low, high, strict, expect in cases:
            fact = {"kind": FEATURES_KIND}
            for other in rs.factors.values():
                post_value(fact, other.feature, None)
            post_value(fact, factor.feature, low, lower_bound=True, operator=factor.operator,
                       at_most=high, at_most_strict=strict)
            hits = [r for r in engine._factors.fire(fact) if r.startswith(f"factor.{fid}.")]
            if hits != [f"factor.{fid}.{expect}"]:
                raise RulesetInconsistentError(
                    f"rule set {rs.id} {rs.version}: bounds {fact} gave {hits}, expected {expect}")
    domains = rs.fact_domains
    names = list(domains)
    n = 0
    for states in itertools.product(*(domains[f] for f in names)):
        fired = engine._decision.fire({"kind": STATES_KIND, **dict(zip(names, states))})
        for prefix in ("group.", "status."):
            hits = [r for r in fired if r.startswith(prefix)]
            if len(hits) != 1:
                combo = ", ".join(f"{k}={s}" for k, s in zip(names, states))
                raise RulesetInconsistentError(
                    f"rule set {rs.id} {rs.version}: for {combo} the {prefix.rstrip('.')} rules "
                    f"that fire are {hits or 'none'}; exactly one must")
        n += 1
    return n
