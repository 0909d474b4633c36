"""AutoAttack: a parameter-free ensemble of four complementary attacks (L-inf and L2).

Croce and Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks" (ICML 2020). The "standard" version runs, in sequence and each only
on the samples that are still classified correctly:

1. APGD-CE: APGD on the cross-entropy, 1 run (its "auto" form: the same steps wherever the
   cross-entropy's float32 gradient is informative, and steps where it underflows);
2. APGD-T: APGD on the targeted DLR loss, 9 target classes, 1 run each;
3. FAB-T: targeted FAB, 9 target classes, 1 run each;
4. Square: 5000 queries, margin loss.

A sample is robust when none of them breaks it; robust accuracy is the fraction of robust
samples. ``extra["robust_accuracy"]`` gives the robust accuracy after each component in order
(``"clean"`` first), ``extra["broken_by"]`` names the component that broke each sample
(``"clean"`` when misclassified already, ``""`` when robust). A component that cannot run on
the inputs (Square on inputs that are not images [N, C, H, W]) is skipped: the others'
results stand, and ``extra["skipped"]`` gives the reason per skipped component.

Arguments (keyword-only): norm "linf" | "l2"; version "standard"; steps (100, the
iterations of APGD, APGD-T and FAB-T; torchattacks' AutoAttack uses its attacks' default of
10); square_queries (5000); n_target_classes (9).

Shapes: x float32 [N, ...] within ``bounds`` (Square runs on images [N, C, H, W] only);
y int64 [N].
"""

from __future__ import annotations

import numpy as np

from .apgd import APGD
from .base import (
    Attack,
    AttackModel,
    AttackRun,
    Progress,
    check,
    check_positive,
    get_norm,
    is_adversarial,
    register_attack,
)
from .fab import FAB
from .square import Square

VERSIONS = ("standard",)


@register_attack
class AutoAttack(Attack):
    """AutoAttack, standard version (Croce and Hein 2020); see the module docstring."""

    name = "autoattack"
    norm = "linf"  # the default; the constructor's `norm` sets it per instance
    norms = ("linf", "l2")
    model_calls = ("logits", "loss_and_grad", "logits_vjp")

    @property
    def gradient_loss(self) -> str:
        return "auto"

    def __init__(self, *, norm: str = "linf", version: str = "standard", steps: int = 100,
                 square_queries: int = 5000, n_target_classes: int = 9):
        get_norm(norm)
        check(version in VERSIONS, f"`version` must be one of {', '.join(VERSIONS)}, got {version!r}")
        check_positive("steps", steps, integer=True)
        check_positive("square_queries", square_queries, integer=True)
        check_positive("n_target_classes", n_target_classes, integer=True)
        self.norm, self.version = norm, version
        self.components: list[tuple[str, Attack]] = [
            ("apgd-ce", APGD(norm=norm, loss="auto", steps=steps)),
            ("apgd-t", APGD(norm=norm, loss="dlr_targeted", steps=steps, n_target_classes=n_target_classes)),
            ("fab-t", FAB(norm=norm, multi_targeted=True, steps=steps, n_target_classes=n_target_classes)),
            ("square", Square(norm=norm, queries=square_queries)),
        ]

    def calls_per_sample(self, num_classes: int) -> int:
        return 1 + sum(attack.calls_per_sample(num_classes) for _, attack in self.components)

    def run(self, model: AttackModel, x: np.ndarray, y: np.ndarray, eps: float | None,
            targets: np.ndarray | None, bounds: tuple[float, float], rng: np.random.Generator,
            progress: Progress | None) -> AttackRun:
        success = is_adversarial(model.logits(x), y, None)
        x_adv = x.copy()
        broken_by = np.where(success, "clean", "").astype(object)
        robust_accuracy = {"clean": float(1 - success.mean()) if len(x) else 0.0}
        skipped = {}
        for done, (name, attack) in enumerate(self.components, start=1):
            todo = np.flatnonzero(~success)
            if isinstance(attack, Square) and x.ndim != 4:
                skipped[name] = (f"Square Attack perturbs square windows of images [N, C, H, W]; "
                                 f"these inputs are [N, {', '.join(map(str, x.shape[1:]))}]")
            else:
                if len(todo):
                    result = attack.run(model, x[todo], y[todo], eps, None, bounds, rng, None)
                    hit = todo[result.success]
                    x_adv[hit], success[hit], broken_by[hit] = result.x_adv[result.success], True, name
                robust_accuracy[name] = float(1 - success.mean()) if len(x) else 0.0
            if progress is not None:
                progress(done, len(self.components))
        extra = {"robust_accuracy": robust_accuracy, "broken_by": broken_by}
        if skipped:
            extra["skipped"] = skipped
        return AttackRun(eps=eps, x_adv=x_adv, success=success, extra=extra)
