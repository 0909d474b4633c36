"""Attack updates as ONNX graphs: one ONNX Runtime call per attack step (or two, or one per class).

The builders take a gradient model (workers/onnxgrad: inputs the image and ``labels``, outputs
``logits``, ``loss`` and ``grad``), a forward model, or nothing, and add an attack's own update,
so that the attack's state (iterates, best points, step sizes, moments) stays in ONNX Runtime's
buffers between calls (workers/bound_loop.py): on a GPU, on the device. Each node is one of the
numpy implementation's operations, in its order (the norms of workers/attacks/base.py, PGD,
APGD, DeepFool, FAB, C&W, Square, L-BFGS and the fooling images' ascent), so the loops give
the numpy loops' adversarial examples: to the bit for PGD, APGD, DeepFool, FAB, Square L-inf
and the fooling images; to float64 rounding for C&W (ONNX Runtime's float64 tanh is not
numpy's), Square L2 (its window sums run over whole images) and L-BFGS (its float64 dot
products sum in another order). The L2 norm
sums its squares in float64 on both sides (``Norm.size``), so the sums' different orders agree
to double rounding and the float32 norm differs only where two sums straddle a float32 rounding
boundary, about once in 10^8 norms. The graphs of the bit-identical loops start from the
model's input, as the plain gradient and forward graphs do, so that ONNX Runtime picks the same
kernels for the model's part (C&W's graph makes its input from the tanh variables).

A loop graph reads state tensors (its inputs) and writes new values of some of them: a
``LoopGraph`` says which output replaces which state. State names start with ``loop/`` except
the models' own inputs (the image, ``labels``, ``targets``).

    gradient_steps  PGD's step; APGD's update, objective with bookkeeping, checkpoint; the
                    fooling images' ascent step and final scores
    minimal         DeepFool's label test, candidate class and step; C&W's Adam step
    boundary        the nearest linearised boundary (DeepFool, FAB); FAB's projections and test
    square          Square's L-inf and L2 proposals and the forward pass that judges them
    lbfgs           L-BFGS's direction, line-search trial and stopping tests
"""

from .boundary import fab_candidate_model, fab_judge_model, fab_plane_model, fab_rival_model, fab_step_model
from .core import LoopGraph, P
from .gradient_steps import (
    apgd_checkpoint_model,
    apgd_objective_model,
    apgd_update_model,
    fooling_final_model,
    fooling_step_model,
    pgd_step_model,
)
from .lbfgs import lbfgs_check_model, lbfgs_direction_model, lbfgs_trial_model
from .minimal import cw_step_model, deepfool_candidate_model, deepfool_check_model, deepfool_step_model
from .square import square_judge_model, square_l2_propose_model, square_propose_model

__all__ = [
    "P", "LoopGraph", "apgd_checkpoint_model", "apgd_objective_model", "apgd_update_model", "cw_step_model",
    "deepfool_candidate_model", "deepfool_check_model", "deepfool_step_model", "fab_candidate_model",
    "fab_judge_model", "fab_plane_model", "fab_rival_model", "fab_step_model", "fooling_final_model",
    "fooling_step_model", "lbfgs_check_model", "lbfgs_direction_model", "lbfgs_trial_model", "pgd_step_model",
    "square_judge_model", "square_l2_propose_model", "square_propose_model",
]
