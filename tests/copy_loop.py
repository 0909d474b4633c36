"""A classifier through the attack protocol alone, for comparing an attack's loops.

`CopyLoop` hides a Classifier's loop graphs (`pgd_steps`, `bound_loop`, `device_loops`): an
attack given it runs its numpy loop, every step's arrays through the host. Tests compare the
device loops (workers/bound_loop.py) with it; bench/attacks.py times it as ``ours_copy``.
"""

from __future__ import annotations

from workers.runtime import Classifier


class CopyLoop:
    def __init__(self, classifier: Classifier):
        self.classifier, self.num_classes = classifier, classifier.num_classes

    def logits(self, x):
        return self.classifier.logits(x)

    def loss_and_grad(self, x, labels, loss="auto", targets=None):
        return self.classifier.loss_and_grad(x, labels, loss=loss, targets=targets)

    def logits_vjp(self, x, dlogits):
        return self.classifier.logits_vjp(x, dlogits)
