#!/usr/bin/env bash
# One command on a machine with a GPU (Metal, or CUDA with `pip install -e ".[cuda,test]"`):
# kernel == its plain-MLX twin, parity with transformers in full float32, then the benchmark.
#     bash scripts/gpu_check.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
export MLX_ENABLE_TF32=0  # CUDA runs float32 matmuls in TF32 by default; parity needs float32
python -c "import mlx_smolvlm, mlx.core as mx; print('device:', mx.default_device(), '| gpu:', mx.is_available(mx.gpu))"
python -m pytest -q tests/test_kernels.py tests/test_model.py tests/test_blas.py
unset MLX_ENABLE_TF32  # the benchmark runs as users do
python bench/bench_peers.py --impls mlx_smolvlm,mlx_vlm "$@"
