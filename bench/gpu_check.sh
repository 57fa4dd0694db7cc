#!/usr/bin/env bash
# GPU checks of issue 12, in one prepared script, for a machine with CUDA and a CUDA build
# of torch already in the active Python environment (it installs nothing):
#   bash bench/gpu_check.sh
# Runs the gpu-marked tests: a rollout, an SFT step, a value and a policy update on CUDA
# (every tensor stays on the GPU, results agree with the CPU run), the fused SDPA kernel
# with the block mask, bf16 weights / bf16 autocast / gradient checkpointing.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA here")'
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
exec timeout 600 python -m pytest -q -p no:xdist -m gpu tests/test_gpu.py "$@"
