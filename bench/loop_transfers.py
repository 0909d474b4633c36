"""Count what crosses between host and device in every attack's loop: the device loops against the
copy loops (the attacks' numpy loops, every model call's arrays through the host).

    .venv/bin/python bench/loop_transfers.py [--model lenet] [--images 64] [--batch 32] [--json PATH]

A `BoundLoop` counts every array it places on its session's device and every array it brings
back (workers/bound_loop.py: ``traffic``); the copy loop's arrays are counted at the model's
interface (inputs in, outputs out of each logits / loss_and_grad / logits_vjp call). The counts
do not depend on where the session runs: the device loops make the same placements on the CPU
(forced here with RuntimeOptions(device_loops=True)) as on CUDA, so this run on a CPU says how
many copies a GPU worker's attack makes per step. Per attack it prints the device loop's graph
calls (one per batch), the copy loop's model calls (each runs every batch), the arrays and
megabytes each way (an array per batch for the device loop), and the bytes moved per image and
step-like call (graph calls per batch; model calls times batches).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from tests import zoo  # noqa: E402
from tests.copy_loop import CopyLoop  # noqa: E402
from workers.attacks.apgd import APGD, APGDT  # noqa: E402
from workers.attacks.cw import CarliniWagnerL2  # noqa: E402
from workers.attacks.deepfool import DeepFool  # noqa: E402
from workers.attacks.fab import FAB  # noqa: E402
from workers.attacks.fooling import gradient_ascent_fooling  # noqa: E402
from workers.attacks.gradient import PGD  # noqa: E402
from workers.attacks.lbfgs import LBFGS  # noqa: E402
from workers.attacks.square import Square  # noqa: E402
from workers.bound_loop import Traffic  # noqa: E402
from workers.runtime import Classifier, RuntimeOptions  # noqa: E402

ATTACKS = {
    "pgd-10": (PGD(steps=10), 8 / 255),
    "pgd-10 l2": (PGD(norm="l2", steps=10), 0.5),
    "apgd-20": (APGD(steps=20), 8 / 255),
    "apgd-t-20": (APGDT(steps=20, n_target_classes=3), 8 / 255),
    "deepfool": (DeepFool(max_iter=20), None),
    "cw_l2": (CarliniWagnerL2(max_iter=100, binary_search_steps=3), None),
    "square-200": (Square(queries=200), 8 / 255),
    "fab-20": (FAB(steps=20), 8 / 255),
    "fab-t-20": (FAB(steps=20, multi_targeted=True, n_target_classes=3), 8 / 255),
    "lbfgs": (LBFGS(search_steps=2, max_iter=20), None),
    "fooling-20": (None, None),
}


class CountingCopyLoop(CopyLoop):
    """The copy loop, counting the arrays of every model call."""

    def __init__(self, classifier: Classifier):
        super().__init__(classifier)
        self.traffic = Traffic()

    def _count(self, inputs, outputs):
        self.traffic.calls += 1
        self.traffic.to_device += len(inputs)
        self.traffic.to_device_bytes += sum(np.asarray(a).nbytes for a in inputs)
        self.traffic.to_host += len(outputs)
        self.traffic.to_host_bytes += sum(np.asarray(a).nbytes for a in outputs)
        return outputs

    def logits(self, x):
        return self._count([x], [super().logits(x)])[0]

    def loss_and_grad(self, x, labels, loss="auto", targets=None):
        sent = [x, labels] + ([] if targets is None else [targets])
        return tuple(self._count(sent, list(super().loss_and_grad(x, labels, loss=loss, targets=targets))))

    def logits_vjp(self, x, dlogits):
        return tuple(self._count([x, dlogits], list(super().logits_vjp(x, dlogits))))


def device_traffic(classifier: Classifier) -> tuple[Classifier, list]:
    """``classifier`` recording the bound loops its attacks create."""
    loops: list = []
    make = classifier.bound_loop

    def recording(arrays):
        loop = make(arrays)
        loops.append(loop)
        return loop

    classifier.bound_loop = recording  # type: ignore[method-assign]
    return classifier, loops


def total(loops) -> Traffic:
    out = Traffic()
    for loop in loops:
        for field in vars(out):
            setattr(out, field, getattr(out, field) + getattr(loop.traffic, field))
    return out


def run(name: str, model, x, y) -> None:
    attack, eps = ATTACKS[name]
    if attack is None:
        targets = np.arange(len(x)) % model.num_classes
        gradient_ascent_fooling(model, targets, x.shape[1:], 20, 0.01, 0.99, np.random.default_rng(0))
    else:
        attack(model, x, y, eps=eps, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--json")
    args = parser.parse_args()
    model_bytes = zoo.export(args.model).SerializeToString()
    options = RuntimeOptions(batch_size=args.batch, device_loops=True)
    x = np.random.default_rng(0).random((args.images, *zoo.input_shape(args.model)), dtype=np.float32)
    y = Classifier(model_bytes, options).predict(x)
    rows = []
    print(f"{args.model}, {args.images} images, batches of {args.batch}: arrays (MB) crossing host <-> "
          "device; left the device loops, right the copy loops")
    print(f"{'attack':<12}{'graph calls':>12}{'to device':>16}{'to host':>16}{'B/img/call':>11}"
          f"{'model calls':>13}{'to device':>16}{'to host':>16}{'B/img/call':>11}")
    for name in ATTACKS:
        classifier, loops = device_traffic(Classifier(model_bytes, options))
        run(name, classifier, x, y)
        bound = total(loops)
        copy = CountingCopyLoop(Classifier(model_bytes, options))
        run(name, copy, x, y)
        host = copy.traffic
        rows.append({"attack": name, "device_loop": vars(bound), "copy_loop": vars(host)})

        def cell(count: int, size: int) -> str:
            return f"{count} ({size / 1e6:.2f})"

        batches = -(-args.images // args.batch)
        per_image = args.images / batches  # images per batch-sized call
        bound_rate = (bound.to_device_bytes + bound.to_host_bytes) / max(bound.calls, 1) / per_image
        copy_rate = (host.to_device_bytes + host.to_host_bytes) / max(host.calls * batches, 1) / per_image
        print(f"{name:<12}{bound.calls:>12}{cell(bound.to_device, bound.to_device_bytes):>16}"
              f"{cell(bound.to_host, bound.to_host_bytes):>16}{bound_rate:>11.0f}"
              f"{host.calls:>13}{cell(host.to_device, host.to_device_bytes):>16}"
              f"{cell(host.to_host, host.to_host_bytes):>16}{copy_rate:>11.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "images": args.images,
                                               "batch": args.batch, "attacks": rows}, indent=1))


if __name__ == "__main__":
    main()
