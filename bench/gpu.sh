#!/usr/bin/env bash
# The GPU check, one prepared script (under 8 minutes on one H100/H200): the CUDA tests, then training
# throughput and peak memory on a 10M-entity graph (bench/gpu.py). Writes bench/results/gpu.{json,md} and
# the test log; with OUT set, copies them there too.
#
#   bench/gpu.sh                   # PYTHON=... picks the interpreter that has CUDA torch (default python3)
#
# It uses the interpreter as it is (no `make install`: GPU machines often have no package index); what
# training needs there is torch, pyarrow, numpy, pyyaml, tqdm and prometheus-client (requirements.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p bench/results

"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__, torch.cuda.get_device_name())'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

# 1. CUDA tests: counter noise equal to the CPU stream, device and backend, a 1-GPU run equal to the CPU
#    torch-ops run on kinships (three objectives), and a run with the default device set to meta (~1 min).
timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/gpu tests/sharding/test_noise.py 2>&1 \
    | tee bench/results/gpu-tests.log || echo "the CUDA tests failed (bench/results/gpu-tests.log); measuring anyway"

# 2. Throughput and peak memory, Bernoulli and sampled softmax, fp32 then TF32 matrix products (~4 min;
#    each run stops before an epoch that would end past 45 s of training).
timeout 320 "$PY" -m bench.gpu --matmul-precision highest high

if [ -n "${OUT:-}" ]; then
    cp bench/results/gpu.md bench/results/gpu.json bench/results/gpu-tests.log "$OUT"/
fi
