#!/usr/bin/env bash
# The GPU checks and figures in one prepared run, for a machine with an NVIDIA GPU:
#
#   bash bench/gpu_checks.sh [OUT_FOLDER]
#
# Needs, in .venv: onnxruntime-gpu in place of onnxruntime (the CUDA provider) and a CUDA build
# of torch for the torch-side references (the CPU wheel the tests pin has no CUDA). It runs
# the CUDA tests (gradients, the digits evaluation, the I/O-bound attack loop against the copy
# loop) and bench/attacks.py --provider cuda (PGD images/s against torchattacks and ART on the
# same GPU, and against our own copy loop) on the small zoo and on ResNet-50 at 224, and APGD
# against torchattacks and the copy loop, and the arrays each attack's loop moves between host and
# device (bench/loop_transfers.py, here on CUDA), writing JSON to OUT_FOLDER ($OUT, else
# ./gpu-figures).
set -u
out="${1:-${OUT:-gpu-figures}}"
mkdir -p "$out"
py=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$py" -m pytest -q tests/test_runtime_cuda.py tests/test_evaluate_cuda.py tests/attacks/test_bound_loop.py tests/test_memory_budget.py \
    -k "cuda" -rs 2>&1 | tail -15 | tee "$out/tests.txt"
"$py" bench/attacks.py --provider cuda --models mlp,lenet,resnet18 --batch 64 --images 256 --budget 150 \
    --json "$out/attacks_small.json" 2>&1 | tail -25 | tee "$out/attacks_small.txt"
"$py" bench/attacks.py --provider cuda --zoo imagenet --models resnet50@dynamo --batch 32 --images 64 \
    --budget 150 --engines ours,ours_copy,torchattacks --json "$out/attacks_resnet50.json" 2>&1 | tail -15 \
    | tee "$out/attacks_resnet50.txt"
"$py" bench/attacks.py --provider cuda --attack apgd --models lenet,resnet18 --batch 64 --images 256 \
    --budget 120 --engines ours,ours_copy,torchattacks --json "$out/apgd_small.json" 2>&1 | tail -20 \
    | tee "$out/apgd_small.txt"
"$py" bench/loop_transfers.py --model lenet --images 64 --batch 32 --json "$out/loop_transfers.json" 2>&1 \
    | tail -14 | tee "$out/loop_transfers.txt"
