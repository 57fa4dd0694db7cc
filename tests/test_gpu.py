"""The one-step device checks of tests/test_devices.py on CUDA (opt-in: ``pytest -m gpu``;
skipped without CUDA).

A rollout, an SFT step, a value update and a policy update with the model on the GPU
keep every tensor there, agree with the CPU run, and also work with bf16 weights, bf16
autocast and gradient checkpointing. Attention runs through SDPA's fused memory-efficient
kernel with the block mask (the math fallback is disabled while it runs).
"""

from __future__ import annotations

import copy

import pytest
import torch
from tests.test_devices import _one_of_each, _update

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = torch.device("cuda")


@pytest.fixture()
def cpu_model(default_tokenizer):
    from tracerl.models import build_for_tokenizer

    return build_for_tokenizer(default_tokenizer, "sdar", seed=0)


def _on_cuda(trainer):
    assert trainer.device.type == "cuda"
    for p in trainer.module.parameters():
        assert p.device.type == "cuda"
    for st in trainer.optimizer.state.values():
        for name, t in st.items():
            if name != "step":  # torch keeps AdamW's step counter on the host
                assert t.device.type == "cuda", name


def test_one_of_each_on_cuda_matches_cpu(cpu_model):
    gpu_model = copy.deepcopy(cpu_model).to(CUDA)
    expected = _one_of_each(cpu_model)
    got = _one_of_each(gpu_model)
    for t in got["trainers"]:
        _on_cuda(t)
    # fp32 on both: the same decoding on these tiny shapes, losses to float tolerance
    for a, b in zip(expected["trajs"], got["trajs"]):
        assert a.response_ids == b.response_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    for me, mg in zip(expected["metrics"], got["metrics"]):
        assert mg["loss"] == pytest.approx(me["loss"], rel=1e-3, abs=1e-5)


def test_fused_attention_kernel_takes_the_block_mask(cpu_model):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gpu_model = copy.deepcopy(cpu_model).to(CUDA)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):  # no math fallback allowed
        trainer, m = _update(gpu_model)
    assert m["skipped"] == 0.0 and m["grad_norm"] > 0
    _on_cuda(trainer)


@pytest.mark.parametrize("variant", ["bf16_weights", "autocast", "checkpointing"])
def test_precision_and_checkpointing_variants_on_cuda(default_tokenizer, variant):
    from tracerl.models import build_for_tokenizer

    dtype = torch.bfloat16 if variant == "bf16_weights" else torch.float32
    lm = build_for_tokenizer(default_tokenizer, "sdar", seed=0, dtype=dtype).to(CUDA)
    trainer, m = _update(lm, bf16=variant == "autocast",
                         gradient_checkpointing=variant == "checkpointing")
    assert m["skipped"] == 0.0 and m["grad_norm"] > 0
    _on_cuda(trainer)
    if variant == "bf16_weights":
        assert all(mw.dtype == torch.float32 for _, mw in trainer.master)
