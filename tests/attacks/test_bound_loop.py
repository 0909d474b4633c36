"""The attack loops with I/O binding (workers/bound_loop.py: the state stays in ONNX Runtime's
buffers from step to step, the host sees the results once) give the copy loops' adversarial
examples (PGD: Classifier.pgd_step once per step; APGD, DeepFool, FAB and Square: their numpy loops,
every array through numpy) to the bit (C&W, Square L2 and L-BFGS: to float64 rounding, see their tests),
on every model of the small zoo, under both norms; on CUDA the same code keeps the loop on the
device."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from tests import zoo
from tests.copy_loop import CopyLoop
from tests.cuda import requires_cuda
from tests.fixed_batch import expand_to_batch_of_two
from workers import runtime
from workers.attacks.apgd import APGD
from workers.attacks.base import clip_to_box, get_norm
from workers.attacks.cw import CarliniWagnerL2
from workers.attacks.deepfool import DeepFool
from workers.attacks.fab import FAB, project_onto_hyperplane
from workers.attacks.fooling import gradient_ascent_fooling
from workers.attacks.gradient import PGD
from workers.attacks.lbfgs import LBFGS
from workers.attacks.square import Square
from workers.loop_graphs import P, fab_step_model
from workers.runtime import Classifier, RunsInterrupted, RuntimeOptions, interrupt_runs, resume_runs

ZOO = ["mlp", "lenet", "vgg", "resnet18", "mobilenet_v2", "mobilenet_v3_small", "squeezenet", "vit",
       "ops_kitchen"]


def _images(name: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, *zoo.input_shape(name)), dtype=np.float32), rng.integers(0, 10, n)


def _copy_loop(classifier, x_adv, x, y, steps, **step):
    for _ in range(steps):
        x_adv = classifier.pgd_step(x_adv, x, y, **step)
    return x_adv


STEPS = {"linf": dict(step=0.01, eps=0.03), "l2": dict(step=0.2, eps=0.6)}


def _both_loops(name: str, attack, targeted: bool, eps: float | None = None, seed: int | None = None):
    """(x, the bound loop's run, the numpy loop's run) of ``attack`` on 19 random images, aimed at
    the next class where ``targeted``."""
    options = RuntimeOptions(batch_size=8, intra_op_threads=1, device_loops=True)
    classifier = Classifier(zoo.export(name).SerializeToString(), options)
    x, _ = _images(name, 19)
    y = classifier.predict(x)
    targets = (y + 1) % classifier.num_classes if targeted else None
    bound, numpy = (attack.run(m, x, y, eps, targets, (0.0, 1.0),
                               None if seed is None else np.random.default_rng(seed), None)
                    for m in (classifier, CopyLoop(classifier)))
    return x, bound, numpy


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", ZOO)
def test_the_bound_loop_equals_the_copy_loop_to_the_bit(name, norm):
    options = RuntimeOptions(batch_size=8, intra_op_threads=1, device_loops=True)
    classifier = Classifier(zoo.export(name).SerializeToString(), options)
    x, y = _images(name, 19)  # three batches, the last one short
    start = np.clip(x + np.random.default_rng(1).uniform(-0.01, 0.01, x.shape).astype(np.float32), 0, 1)
    before = start.copy()
    step = dict(loss="auto", norm=norm, bounds=(0.0, 1.0), **STEPS[norm])
    seen = []
    bound = classifier.pgd_steps(start, x, y, steps=4, progress=seen.append, **step)
    np.testing.assert_array_equal(bound, _copy_loop(classifier, start, x, y, 4, **step))
    np.testing.assert_array_equal(start, before)  # the caller's array is never a buffer of the loop
    assert seen == [1, 2, 3, 4] and not np.array_equal(bound, start)


@pytest.mark.parametrize("make", [lambda steps: PGD(steps=steps), lambda steps: APGD(steps=steps),
                                  lambda steps: FAB(steps=steps)], ids=["pgd", "apgd", "fab"])
def test_nothing_crosses_between_host_and_device_during_the_steps(make):
    # what crosses is counted where the arrays are placed and fetched (BoundLoop.traffic), the
    # same on the CPU as on CUDA: twice the steps, the same arrays and bytes, more graph calls
    # (and 0-d scalars placed once per value: APGD's checkpoints have thresholds of their own)
    def traffic(steps: int):
        classifier = Classifier(zoo.export("lenet").SerializeToString(),
                                RuntimeOptions(batch_size=8, device_loops=True))
        loops = []
        make_loop = classifier.bound_loop
        classifier.bound_loop = lambda arrays: loops.append(make_loop(arrays)) or loops[-1]
        x, _ = _images("lenet", 19)
        make(steps)(classifier, x, classifier.predict(x), eps=0.03, seed=0)
        return [loop.traffic for loop in loops]

    short, long = traffic(5), traffic(10)
    assert len(short) == len(long) > 0
    for a, b in zip(short, long, strict=True):
        assert (a.to_device - a.scalars, a.to_host, a.to_host_bytes) == \
            (b.to_device - b.scalars, b.to_host, b.to_host_bytes)
        assert abs(a.to_device_bytes - b.to_device_bytes) <= 8 * abs(a.scalars - b.scalars)
        assert b.calls > a.calls > 0


def test_device_loops_default_to_where_the_session_runs_on_cuda():
    model = zoo.export("mlp").SerializeToString()
    assert Classifier(model, RuntimeOptions()).device_loops is (Classifier(model).device == "cuda")
    assert Classifier(model, RuntimeOptions(device_loops=True)).device_loops is True
    assert Classifier(model, RuntimeOptions(device_loops=False)).device_loops is False
    # FAB's and the fooling images' loops run as graphs on the CPU too, unless turned off
    assert Classifier(model, RuntimeOptions()).cheap_loops is True
    assert Classifier(model, RuntimeOptions(device_loops=False)).cheap_loops is False


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", ZOO)
def test_the_bound_apgd_loop_equals_the_numpy_loop_to_the_bit(name, norm):
    options = RuntimeOptions(batch_size=8, intra_op_threads=1, device_loops=True)
    classifier = Classifier(zoo.export(name).SerializeToString(), options)
    x, y = _images(name, 19)
    attack = APGD(norm=norm, steps=10)  # checkpoints after steps 2, 4, 6, 8 and 10
    eps = STEPS[norm]["eps"]
    bound = attack.run(classifier, x, y, eps, None, (0.0, 1.0), np.random.default_rng(3), None)
    numpy = attack.run(CopyLoop(classifier), x, y, eps, None, (0.0, 1.0), np.random.default_rng(3), None)
    np.testing.assert_array_equal(bound.x_adv, numpy.x_adv)
    np.testing.assert_array_equal(bound.success, numpy.success)


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("name", ZOO)
def test_the_bound_deepfool_loop_equals_the_numpy_loop_to_the_bit(name, norm):
    options = RuntimeOptions(batch_size=8, intra_op_threads=1, device_loops=True)
    classifier = Classifier(zoo.export(name).SerializeToString(), options)
    x, _ = _images(name, 19)
    y = classifier.predict(x)
    y[::3] = (y[::3] + 1) % classifier.num_classes  # misclassified from the start: never attacked
    attack = DeepFool(norm=norm, max_iter=8, candidates=4)
    seen = []
    bound = attack.run(classifier, x, y, None, None, (0.0, 1.0), None, lambda done, total: seen.append(done))
    numpy = attack.run(CopyLoop(classifier), x, y, None, None, (0.0, 1.0), None, None)
    np.testing.assert_array_equal(bound.x_adv, numpy.x_adv)
    np.testing.assert_array_equal(bound.success, numpy.success)
    np.testing.assert_array_equal(bound.extra["iterations"], numpy.extra["iterations"])
    assert seen[0] == 7 and seen == sorted(seen)  # progress counts the samples done


@pytest.mark.parametrize("targeted", [False, True])
@pytest.mark.parametrize("name", ["mlp", "lenet", "mobilenet_v3_small", "vit", "ops_kitchen"])
def test_the_bound_cw_loop_follows_the_numpy_loop(name, targeted):
    # ONNX Runtime's float64 tanh differs from numpy's in the last bits: the float64 states
    # differ there, the float32 iterates (almost always) not at all
    attack = CarliniWagnerL2(max_iter=12, binary_search_steps=3, learning_rate=0.05, initial_const=0.5)
    _, bound, numpy = _both_loops(name, attack, targeted)
    np.testing.assert_array_equal(bound.success, numpy.success)
    np.testing.assert_array_equal(bound.extra["const"], numpy.extra["const"])
    np.testing.assert_allclose(bound.x_adv, numpy.x_adv, rtol=0, atol=1e-6)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("targeted", [False, True])
@pytest.mark.parametrize("name", ["mlp", "lenet", "mobilenet_v3_small", "vit", "ops_kitchen"])
def test_the_bound_square_loop_equals_the_numpy_loop(name, targeted, norm):
    # L2's window sums run over whole images in the loop graph (zeros outside the window): the
    # same float64 terms in another order, so equal up to float64 rounding (L-inf: to the bit)
    _, bound, numpy = _both_loops(name, Square(norm=norm, queries=150), targeted,
                                  eps=0.1 if norm == "linf" else 1.5, seed=4)
    np.testing.assert_allclose(bound.x_adv, numpy.x_adv, rtol=0, atol=0 if norm == "linf" else 1e-6)
    np.testing.assert_array_equal(bound.success, numpy.success)
    np.testing.assert_array_equal(bound.queries, numpy.queries)


@pytest.mark.parametrize("mode", ["untargeted", "fab-t", "targeted"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", ["mlp", "lenet", "mobilenet_v3_small", "vit", "ops_kitchen"])
def test_the_bound_fab_loop_equals_the_numpy_loop_to_the_bit(name, norm, mode):
    options = RuntimeOptions(batch_size=8, intra_op_threads=1, device_loops=True)
    classifier = Classifier(zoo.export(name).SerializeToString(), options)
    x, _ = _images(name, 19)
    y = classifier.predict(x)
    targets = (y + 1) % classifier.num_classes if mode == "targeted" else None
    attack = FAB(norm=norm, steps=5, restarts=2, multi_targeted=mode == "fab-t", n_target_classes=3)
    bound, numpy = (attack.run(m, x, y, 0.03 if norm == "linf" else 0.5, targets, (0.0, 1.0),
                               np.random.default_rng(3), None) for m in (classifier, CopyLoop(classifier)))
    np.testing.assert_array_equal(bound.extra["distance"], numpy.extra["distance"])  # outside eps too
    np.testing.assert_array_equal(bound.x_adv, numpy.x_adv)
    np.testing.assert_array_equal(bound.success, numpy.success)


@pytest.mark.parametrize("targeted", [False, True])
@pytest.mark.parametrize("name", ["mlp", "lenet", "vit", "ops_kitchen"])
def test_the_bound_lbfgs_loop_follows_the_numpy_loop(name, targeted):
    # float64 dot products summed in another order: the same searches, with iterates that part
    # by rounding where a line search's test is close (measured: L2 sizes within 1.5%)
    x, bound, numpy = _both_loops(name, LBFGS(search_steps=3, max_iter=20), targeted)
    np.testing.assert_array_equal(bound.success, numpy.success)
    np.testing.assert_array_equal(bound.extra["const"], numpy.extra["const"])
    sizes = [np.linalg.norm((run.x_adv - x).reshape(len(x), -1), axis=1) for run in (bound, numpy)]
    np.testing.assert_allclose(*sizes, rtol=0.03, atol=1e-6)
    assert np.median(np.abs(sizes[0] - sizes[1])) <= 1e-4 * np.median(sizes[1]) + 1e-9


@pytest.mark.parametrize("loss", ["cross_entropy", "logit"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", ["mlp", "lenet", "mobilenet_v3_small", "vit", "ops_kitchen"])
def test_the_bound_fooling_ascent_equals_the_numpy_loop(name, norm, loss):
    options = RuntimeOptions(batch_size=8, intra_op_threads=1, device_loops=True)
    classifier = Classifier(zoo.export(name).SerializeToString(), options)
    targets = np.arange(19) % classifier.num_classes
    shape = zoo.input_shape(name)
    step = 0.02 if norm == "linf" else 0.5
    seen = []
    bound, numpy = (gradient_ascent_fooling(m, targets, shape, 8, step, 0.3, np.random.default_rng(2),
                                            norm=norm, loss=loss, progress=progress)
                    for m, progress in ((classifier, lambda done, total: seen.append(done / total)),
                                        (CopyLoop(classifier), None)))
    # the numpy loop drops the images that reached their target from its batches, the loop graph
    # keeps them in place; ONNX Runtime's ViT gradient of a row changes in the last bits with the
    # row's position in the batch (measured), so there the later steps agree to float32 rounding
    tolerance = 1e-5 if name == "vit" else 0
    np.testing.assert_allclose(bound.images, numpy.images, rtol=0, atol=tolerance)
    np.testing.assert_array_equal(bound.steps_used, numpy.steps_used)
    np.testing.assert_array_equal(bound.reached, numpy.reached)
    np.testing.assert_array_equal(bound.predicted, numpy.predicted)
    # the softmax's float64 sum runs in another order: equal to double rounding
    np.testing.assert_allclose(bound.confidences, numpy.confidences, rtol=1e-12 if not tolerance else 1e-5,
                               atol=0)
    assert numpy.steps_used.max() > 0 and seen == sorted(seen)
    if name == "vit":  # the case above: some images stop early, the others run on
        assert 0 < numpy.reached.sum() < len(targets)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fabs_step_graph_projects_as_numpy_does(norm):
    # the move's two exact projections onto the linearised boundary inside the box, on rows
    # that make every branch happen: ties among the knots (pixels on the box's faces), zero
    # gradient entries, boundaries out of the box's reach, and one already through the iterate
    rng = np.random.default_rng(5)
    n, shape, bounds = 12, (1, 6, 6), (0.0, 1.0)
    x0 = rng.choice(np.float32([0.0, 0.25, 0.5, 1.0]), size=(n, *shape)).astype(np.float32)
    x1 = np.clip(x0 + rng.uniform(-0.2, 0.2, x0.shape).astype(np.float32), 0, 1)
    w = rng.standard_normal(x0.shape).astype(np.float32)
    w[:, :, :2] = 0.0
    f = rng.standard_normal(n) * 3
    f[:3] *= 1e3  # far: the box stops the projection before the boundary
    f[3] = 0.0
    graph = fab_step_model((None, *shape), "image", norm, eta=1.05, alpha_max=0.1, bounds=bounds)
    session = ort.InferenceSession(graph.model.SerializeToString(), providers=["CPUExecutionProvider"])
    (landed,) = session.run(None, {"image": x1, P + "x": x0, P + "best_w": w, P + "best_f": f})
    flat1, flat0, wf = x1.reshape(n, -1), x0.reshape(n, -1), w.reshape(n, -1)
    b = np.einsum("ij,ij->i", wf, flat1, dtype=np.float64) - f
    geometry = get_norm(norm)
    d1, d0 = (project_onto_hyperplane(t, wf, b, bounds, norm) for t in (flat1, flat0))
    a1, a0 = (np.maximum(geometry.size(d), 1e-8) for d in (d1, d0))
    alpha = np.clip(a1 / (a1 + a0), 0.0, 0.1).reshape(-1, 1)
    moved = (1 - alpha) * (flat1 + 1.05 * d1) + alpha * (flat0 + 1.05 * d0)
    np.testing.assert_array_equal(landed, clip_to_box(moved.reshape(x0.shape), bounds))
    assert not np.array_equal(landed, x1) and np.isfinite(landed).all()


@pytest.mark.parametrize("attack", [APGD(steps=10), DeepFool(max_iter=10),
                                    CarliniWagnerL2(max_iter=12, binary_search_steps=2, initial_const=5.0),
                                    FAB(steps=5, restarts=2), LBFGS(search_steps=2, max_iter=10)],
                         ids=["apgd", "deepfool", "cw", "fab", "lbfgs"])
def test_the_bound_loops_hold_a_chunk_of_samples_at_a_time(attack, monkeypatch):
    monkeypatch.setattr(runtime, "LOOP_BATCHES", 1)  # loops of one batch: 8 + 8 + 3 samples
    options = RuntimeOptions(batch_size=8, intra_op_threads=1, device_loops=True)
    classifier = Classifier(zoo.export("mlp").SerializeToString(), options)
    assert classifier.loop_rows == 8
    x, _ = _images("mlp", 19)
    y = classifier.predict(x)
    eps = {"apgd": 0.1, "fab": 0.05}.get(attack.name)
    seen = []
    (bound,) = attack(classifier, x, y, eps=eps, seed=1,
                      progress=lambda done, total: seen.append(done / total))
    numpy = attack(CopyLoop(classifier), x, y, eps=eps, seed=1)[0]
    atol = {"cw_l2": 1e-6, "lbfgs": 1e-3}.get(attack.name, 0)
    np.testing.assert_allclose(bound.x_adv, numpy.x_adv, rtol=0, atol=atol)
    np.testing.assert_array_equal(bound.success, numpy.success)
    assert bound.success.any() and seen == sorted(seen) and seen[-1] == 1


@pytest.mark.parametrize("attack", [APGD(steps=10, loss="ce"), APGD(norm="l2", steps=10, loss="ce"),
                                    APGD(steps=6, loss="dlr")], ids=["ce-targeted", "ce-targeted-l2", "dlr"])
def test_bound_apgd_equals_the_numpy_loop_on_a_fixed_batch_model(attack):
    rng = np.random.default_rng(0)
    model, _, _ = expand_to_batch_of_two(rng)
    classifier = Classifier(model, RuntimeOptions(batch_size=64, device_loops=True))
    assert classifier.fixed_batch == 2  # runs two samples at a time, the last batch padded
    x, y = rng.random((5, 4), dtype=np.float32), np.array([0, 1, 2, 1, 0])
    targets = None if attack.loss == "dlr" else (y + 1) % classifier.num_classes
    eps = 0.3 if attack.norm == "linf" else 0.6
    runs = [attack.run(m, x, y, eps, targets, (0.0, 1.0), np.random.default_rng(1), None)
            for m in (classifier, CopyLoop(classifier))]
    np.testing.assert_array_equal(runs[0].x_adv, runs[1].x_adv)
    np.testing.assert_array_equal(runs[0].success, runs[1].success)


@pytest.mark.parametrize("attack", [FAB(steps=5), FAB(norm="l2", steps=5, multi_targeted=True),
                                    LBFGS(search_steps=2, max_iter=10)], ids=["fab", "fab-t-l2", "lbfgs"])
def test_bound_fab_and_lbfgs_equal_the_numpy_loops_on_a_fixed_batch_model(attack):
    rng = np.random.default_rng(0)
    model, _, _ = expand_to_batch_of_two(rng)
    classifier = Classifier(model, RuntimeOptions(batch_size=64, device_loops=True))
    x, y = rng.random((5, 4), dtype=np.float32), np.array([0, 1, 2, 1, 0])
    runs = [attack.run(m, x, y, 0.3, None, (0.0, 1.0), np.random.default_rng(1), None)
            for m in (classifier, CopyLoop(classifier))]
    np.testing.assert_array_equal(runs[0].x_adv, runs[1].x_adv)
    np.testing.assert_array_equal(runs[0].success, runs[1].success)
    assert runs[0].success.any()


def test_a_fixed_batch_model_is_padded_as_the_copy_loop_pads_it():
    # Expand to a constant batch of 2 (tests/test_runtime.py): runs two samples at a time
    rng = np.random.default_rng(0)
    model, _, _ = expand_to_batch_of_two(rng)
    classifier = Classifier(model, RuntimeOptions(batch_size=64, device_loops=True))
    assert classifier.fixed_batch == 2
    x, y = rng.random((5, 4), dtype=np.float32), np.array([0, 1, 2, 1, 0])
    # targeted: descends
    step = dict(loss="cross_entropy", norm="linf", step=-0.01, eps=0.05, bounds=(0.0, 1.0))
    np.testing.assert_array_equal(classifier.pgd_steps(x, x, y, steps=3, **step),
                                  _copy_loop(classifier, x, x, y, 3, **step))


def test_a_cancel_interrupts_the_bound_loop():
    classifier = Classifier(zoo.export("mlp").SerializeToString(), RuntimeOptions(batch_size=4))
    x, y = _images("mlp", 12)
    try:
        with pytest.raises(RunsInterrupted):
            classifier.pgd_steps(x, x, y, steps=50, loss="auto", norm="linf", step=0.01, eps=0.1,
                                 bounds=(0.0, 1.0), progress=lambda i: interrupt_runs() if i == 2 else None)
    finally:
        resume_runs()


@requires_cuda
@pytest.mark.parametrize("attack", [APGD(steps=10), APGD(norm="l2", steps=10), DeepFool(max_iter=10),
                                    CarliniWagnerL2(max_iter=20, binary_search_steps=2), Square(queries=100),
                                    Square(norm="l2", queries=100), FAB(steps=10), FAB(norm="l2", steps=10),
                                    LBFGS(search_steps=3, max_iter=20)],
                         ids=["apgd", "apgd-l2", "deepfool", "cw", "square", "square-l2", "fab", "fab-l2",
                              "lbfgs"])
def test_on_cuda_the_bound_attacks_agree_with_the_copy_loops(attack):
    # on the GPU the loop graphs and the plain gradient graph may get different cuDNN kernels:
    # the same attack, not the same bits
    classifier = Classifier(zoo.export("lenet").SerializeToString(), RuntimeOptions(batch_size=8))
    assert classifier.device == "cuda"
    x, _ = _images("lenet", 19)
    y = classifier.predict(x)
    eps = 0.03 if attack.norm == "linf" else 0.6
    bound, numpy = (attack.run(m, x, y, eps, None, (0.0, 1.0), np.random.default_rng(3), None)
                    for m in (classifier, CopyLoop(classifier)))
    assert abs(int(bound.success.sum()) - int(numpy.success.sum())) <= 1
    np.testing.assert_array_equal(bound.success, classifier.predict(bound.x_adv) != y)
    assert bound.x_adv.min() >= 0 and bound.x_adv.max() <= 1


@requires_cuda
def test_on_cuda_the_bound_fooling_ascent_agrees_with_the_copy_loop():
    classifier = Classifier(zoo.export("lenet").SerializeToString(), RuntimeOptions(batch_size=8))
    assert classifier.device == "cuda"
    targets = np.arange(19) % classifier.num_classes
    bound, numpy = (gradient_ascent_fooling(m, targets, zoo.input_shape("lenet"), 20, 0.02, 0.5,
                                            np.random.default_rng(2))
                    for m in (classifier, CopyLoop(classifier)))
    assert abs(int(bound.reached.sum()) - int(numpy.reached.sum())) <= 1
    np.testing.assert_array_equal(bound.reached, (bound.predicted == targets) & (bound.confidences >= 0.5))
    assert bound.images.min() >= 0 and bound.images.max() <= 1


@requires_cuda
@pytest.mark.parametrize("name", ["lenet", "resnet18"])
def test_on_cuda_the_bound_loop_equals_the_copy_loop(name):
    classifier = Classifier(zoo.export(name).SerializeToString(), RuntimeOptions(batch_size=8))
    assert classifier.device == "cuda"
    x, y = _images(name, 19)
    for norm in ("linf", "l2"):
        step = dict(loss="auto", norm=norm, bounds=(0.0, 1.0), **STEPS[norm])
        np.testing.assert_array_equal(classifier.pgd_steps(x, x, y, steps=4, **step),
                                      _copy_loop(classifier, x, x, y, 4, **step))
        attack = APGD(norm=norm, steps=10)
        runs = [attack.run(m, x, y, step["eps"], None, (0.0, 1.0), np.random.default_rng(3), None)
                for m in (classifier, CopyLoop(classifier))]
        np.testing.assert_array_equal(runs[0].x_adv, runs[1].x_adv)
