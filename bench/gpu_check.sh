#!/usr/bin/env bash
# GPU checks of issue 12, in one prepared script, for a machine with CUDA and a CUDA build
# of torch already in the active Python environment (it installs nothing):
#   bash bench/gpu_check.sh
# Runs the gpu-marked tests: a rollout, an SFT step, a value and a policy update on CUDA
# (every tensor stays on the GPU, results agree with the CPU run), the fused SDPA kernel
# with the block mask, bf16 weights / bf16 autocast / gradient checkpointing. Then the
# figures (record them in docs/benchmarks.md against JetEngine's 5,000+ tokens/s per H200
# for SDAR-4B at batch 128): TraDo-4B-shaped rollout tokens/s at batch 128, 512 new
# tokens, static and dynamic (bench_rollout.py); one TraceRL update, full and LoRA, with a
# KL penalty to the reference: seconds and peak memory (gpu_update.py). About 8-10 minutes
# on an H200 after the machine starts.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA here")'
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
status=0
timeout 300 python -m pytest -q -p no:xdist -m gpu tests/test_gpu.py "$@" || status=$?
timeout 240 python bench/bench_rollout.py --device cuda --trado --tokens 512 --batches 128 \
  --cached-only --repeats 1 || status=$?
timeout 300 python bench/gpu_update.py --device cuda --kl || status=$?
exit "$status"
