"""What an evaluation will cost before it runs: model calls times samples.

The unit is one sample through the model once (a forward pass, or a forward and backward
pass): PGD with 40 steps and one restart costs 41 per sample and budget, so two budgets on
1,000 samples cost 82,000. Each attack counts its own calls (``Attack.calls_per_sample``, an
upper bound: early stopping makes most runs cheaper). The service bounds a job by it
(ROBUSTNESS_MAX_JOB_COST) and a tenant's queued and running work by its sum
(ROBUSTNESS_TENANT_COST_QUOTA); a client sees it in the submission's response.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.evaluation import AttackSpec, EvaluationSpec
from workers.defenses import DEFENSES
from workers.plan import budget_count
from workers.spec_checks import build_attack


@dataclass(frozen=True)
class Cost:
    total: int
    parts: dict[str, int]  # "clean", each attack's key, "defense:<key>", "transfer", "fooling", "certify"


def attack_calls(attack: AttackSpec, num_classes: int) -> int:
    """Model calls per sample of one attack entry: every budget, every target for ``targets: all``."""
    per_run = build_attack(attack).calls_per_sample(num_classes)
    targets = num_classes - 1 if attack.target_mode == "all" else 1
    return budget_count(attack) * targets * per_run


# model calls per sample and budget, from bench/certify.py's times against a forward pass:
# IBP 2.5-6x, CROWN-IBP 20-24x; alpha-CROWN adds a forward and a backward of that graph per step
# (workers.certify.bounds.ALPHA_STEPS, 20); full CROWN: 1,100x a forward pass on the small zoo's
# MLP, 2,200x on its LeNet, 22x on ResNet-18 (whose layers all pass
# workers.certify.crown.FULL_CROWN_ELEMENTS): charged at the dearest
CERTIFY_CALLS = {"ibp": 4, "crown_ibp": 24, "crown": 2200, "alpha_crown": 24 * (1 + 2 * 20)}


def estimate(spec: EvaluationSpec, num_samples: int, num_classes: int) -> Cost:
    """The cost of evaluating the first ``spec.samples`` of ``num_samples`` samples; ``spec``
    passed workers.spec_checks.check_spec."""
    n = num_samples if spec.samples == "all" else min(spec.samples, num_samples)
    parts = {"clean": n}
    runs = 0  # adversarial sets that each defense re-classifies
    for attack in spec.attacks:
        parts[attack.key] = n * attack_calls(attack, num_classes)
        runs += budget_count(attack) * (num_classes - 1 if attack.target_mode == "all" else 1)
    attacks_per_sample = sum(attack_calls(a, num_classes) for a in spec.attacks)
    for defense in spec.defenses:
        draws = defense.eot_samples if DEFENSES[defense.name].random else 1
        adaptive = attacks_per_sample * draws if defense.adaptive else 0
        curve = len(defense.curve or ()) * (1 + runs)
        parts[f"defense:{defense.key}"] = n * (1 + runs + adaptive + curve)
    if spec.transfer is not None:
        transfer = spec.transfer
        sources, targets = len(transfer.names("sources")), len(transfer.names("targets"))
        crafted = sum(attack_calls(a, num_classes) for a in transfer.attacks)
        examples = sum(budget_count(a) for a in transfer.attacks)
        parts["transfer"] = n * sources * (crafted + examples * targets)
    if spec.fooling is not None:
        parts["fooling"] = spec.fooling.samples * (1 + num_classes * (spec.fooling.steps + 1))
    if spec.certify is not None:
        per_budget = sum(CERTIFY_CALLS[method] for method in spec.certify.methods)
        parts["certify"] = n * len(spec.certify.eps) * per_budget
    return Cost(sum(parts.values()), parts)
