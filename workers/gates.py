"""Gates: a metric of the result against its bounds and baseline, and its verdict."""

from __future__ import annotations

from schemas.evaluation import AttackResult, CertifiedEntry, EvaluationResult, GateResult, GateSpec


def evaluate_gate(gate: GateSpec, clean_accuracy: float, entries: list[AttackResult],
                  baselines: dict[str, EvaluationResult] | None = None,
                  certified: list[CertifiedEntry] | None = None) -> GateResult:
    """Find the metric a gate names and compare it with its bounds and its baseline.

    Without ``eps`` the gate reads the entry with the largest budget (the hardest test). With
    ``baseline`` it passes when the value is at least the baseline's value less ``max_drop``.
    A gate that would pass on an entry carrying a masking warning is inconclusive (masking
    overstates robustness, so a failure stands): passed only with ``allow_inconclusive``.
    """
    base = gate.model_dump()
    value, reason, entry = _gate_value(gate, clean_accuracy, entries, certified)
    if value is None:
        return GateResult(**base, value=None, passed=False, verdict="failed", reason=reason)
    passed = (gate.min is None or value >= gate.min) and (gate.max is None or value <= gate.max)
    reference = None
    if gate.baseline is not None:
        baseline = (baselines or {}).get(gate.baseline)
        if baseline is None:
            return GateResult(**base, value=value, passed=False, verdict="failed",
                              reason=f"the baseline {gate.baseline!r} is not available")
        reference, reason, _ = _gate_value(gate, baseline.clean_accuracy, baseline.attacks,
                                           baseline.certify.entries if baseline.certify else None)
        if reference is None:
            return GateResult(**base, value=value, passed=False, verdict="failed",
                              reason=f"baseline {gate.baseline!r}: {reason}")
        max_drop = gate.max_drop
        assert max_drop is not None  # GateSpec's validator: `baseline` and `max_drop` go together
        kept = value >= reference - max_drop - 1e-9  # float rounding of the difference
        reason = None if kept else (f"{gate.metric} dropped by {reference - value:.4g} from the baseline's "
                                    f"{reference:.4g}, more than max_drop {max_drop:g}")
        passed = passed and kept
    warnings = list(entry.warnings) if entry is not None else []
    if not passed:
        return GateResult(**base, value=value, baseline_value=reference, passed=False, verdict="failed",
                          reason=reason, warnings=warnings)
    if not warnings:
        return GateResult(**base, value=value, baseline_value=reference, passed=True, verdict="passed")
    more = f" (and {len(warnings) - 1} more warning{'s' * (len(warnings) > 2)})" if len(warnings) > 1 else ""
    if gate.allow_inconclusive:
        return GateResult(**base, value=value, baseline_value=reference, passed=True, verdict="passed",
                          accepted_inconclusive=True,
                          reason=f"accepted as inconclusive (allow_inconclusive): {warnings[0]}{more}",
                          warnings=warnings)
    return GateResult(**base, value=value, baseline_value=reference, passed=False, verdict="inconclusive",
                      reason=f"inconclusive: {warnings[0]}{more}", warnings=warnings)


def _gate_value(gate: GateSpec, clean_accuracy: float, entries: list[AttackResult],
                certified: list[CertifiedEntry] | None = None
                ) -> tuple[float | None, str | None, AttackResult | None]:
    """The value of the gate's metric in a result and the entry it comes from, or None and why not."""
    if gate.metric == "clean_accuracy":
        return clean_accuracy, None, None
    if gate.metric == "certified_accuracy":
        bounds = [c for c in certified or [] if c.method == gate.attack
                  and (gate.eps is None or abs(c.eps - gate.eps) < 1e-9)
                  and (gate.norm is None or c.norm == gate.norm)]
        if not bounds:
            return None, (f"no certified accuracy of {gate.attack} at eps={gate.eps} (is certify "
                          "available for this model?)"), None
        return max(bounds, key=lambda c: c.eps).certified_accuracy, None, None
    matching = [e for e in entries if e.attack == gate.attack
                and (gate.eps is None or (e.eps is not None and abs(e.eps - gate.eps) < 1e-9))
                and (gate.norm is None or e.norm == gate.norm)]
    if not matching:
        return None, f"no result of {gate.attack} at eps={gate.eps} norm={gate.norm}", None
    entry = max(matching, key=lambda e: e.eps if e.eps is not None else 0.0)
    value = getattr(entry, gate.metric)
    if value is None:
        return None, f"{gate.metric} is not available for {gate.attack}", entry
    return value, None, entry
