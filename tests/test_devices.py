"""Device and dtype discipline without a GPU.

With torch's default device set to ``meta``, any tensor that some code path creates
without an explicit device lands on ``meta`` and the first operation mixing it with a
real tensor fails. One rollout, one SFT step, one value update and one policy update run
that way with the model on the CPU; their results must equal the same calls run
normally, and every tensor of the updates (weights, gradients, optimizer state, batches)
must stay on the model's device. Also here: bf16 weights with fp32 master weights and
moments, gradient checkpointing against plain backward, and the bad-device errors.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tracerl.devices import DeviceError, resolve_device, resolve_dtype
from tracerl.models import ValueModel, build_for_tokenizer
from tracerl.rl import (
    PolicyConfig,
    SFTConfig,
    TokenScorer,
    TrainConfig,
    Trainer,
    ValueConfig,
    ValueScorer,
    policy_update,
    sample_from_trajectory,
    sft_train,
    value_update,
)
from tracerl.rl.rows import build_trace_rows, collate
from tracerl.sampling import SamplingConfig, generate


def _one_of_each(model):
    """A rollout, then an SFT step, a value update and a policy update on its samples
    (the policy with a reference-model KL, so the reference scoring path runs too)."""
    cfg = SamplingConfig(block_size=4, steps_per_block=2, max_tokens=8, batch_size=4)
    prompts = [list(range(10, 10 + n)) for n in (3, 5, 6, 6)]
    trajs = generate(model, prompts, cfg, torch.Generator().manual_seed(0))
    samples = [sample_from_trajectory(t, advantage=a, sample_id=str(i))
               for i, (t, a) in enumerate(zip(trajs, (1.0, -1.0, 0.5, -0.5)))]
    tc = TrainConfig(lr=1e-2, micro_batch=2, grad_accum=2)
    sft = Trainer(TokenScorer(model), tc, kind="sft")
    m_sft = sft_train(sft, samples, SFTConfig(), steps=1)
    vm = ValueModel(copy.deepcopy(model))
    value = Trainer(ValueScorer(vm), tc, kind="value")
    advs, _, m_value = value_update(value, samples, ValueConfig())
    ref = copy.deepcopy(model)
    policy = Trainer(TokenScorer(model), tc, kind="policy")
    m_policy = policy_update(policy, samples, PolicyConfig(beta=0.1, kl_target="reference"),
                             ref_model=ref)
    return dict(trajs=trajs, advs=advs, metrics=(m_sft, m_value, m_policy),
                trainers=(sft, value, policy), vm=vm)


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_meta_default_device_catches_tensors_created_without_a_device(default_tokenizer):
    with torch.device("meta"):  # the trap works: an implicit tensor lands on meta
        assert torch.zeros(1).device.type == "meta"
        with pytest.raises((RuntimeError, NotImplementedError)):
            (torch.zeros(2) + torch.ones(2, device="cpu")).tolist()

    ref_model = build_for_tokenizer(default_tokenizer, "sdar", seed=0)
    model = copy.deepcopy(ref_model)
    expected = _one_of_each(ref_model)
    with torch.device("meta"):
        got = _one_of_each(model)

    # the same results as outside the trap (rollout, advantages, metrics, weights)
    for a, b in zip(expected["trajs"], got["trajs"]):
        assert a.response_ids == b.response_ids and a.decode_steps == b.decode_steps
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-6)
    assert got["advs"] == expected["advs"]
    for me, mg in zip(expected["metrics"], got["metrics"]):
        assert mg["loss"] == pytest.approx(me["loss"], rel=1e-5)
        assert mg["steps"] >= 1 and mg["skipped"] == 0.0
    for k, v in _state(ref_model).items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    # everything an update touched stayed on the model's device
    for trainer in got["trainers"]:
        assert trainer.device == torch.device("cpu")
        for p in trainer.module.parameters():
            assert p.device.type == "cpu" and p.grad is None
        for st in trainer.optimizer.state.values():
            for name, t in st.items():
                assert t.device.type == "cpu", name
    assert got["vm"].head.weight.device.type == "cpu"


def test_collate_builds_the_batch_on_the_requested_device(default_tokenizer):
    from tests.test_trainer import make_samples

    model = build_for_tokenizer(default_tokenizer, "sdar", seed=0)
    rows, _ = build_trace_rows(make_samples(3), block_size=4, mask_id=model.tokens.mask_id)
    for r in rows:
        r.tokens["mask"] = torch.ones(r.num_targets)
    with torch.device("meta"):
        b = collate(rows, model.tokens.pad_id, torch.device("cpu"))
    tensors = [b.input_ids, b.visible, b.position_ids, b.target_row, b.labels,
               *b.tokens.values()]
    assert all(t.device.type == "cpu" for t in tensors)
    meta = collate(rows, model.tokens.pad_id, "meta")  # every field, the masks included
    assert all(t.device.type == "meta" for t in (meta.input_ids, meta.visible,
                                                   *meta.tokens.values()))
    assert b.to("cpu") is b


def _update(lm, **cfg):
    from tests.test_trainer import make_samples

    trainer = Trainer(TokenScorer(lm), TrainConfig(lr=1e-3, micro_batch=4, **cfg))
    m = policy_update(trainer, make_samples(4), PolicyConfig(use_recorded_logprobs=False))
    return trainer, m


def test_gradient_checkpointing_gives_the_same_update(default_tokenizer):
    plain = build_for_tokenizer(default_tokenizer, "sdar", seed=0)
    ckpt = copy.deepcopy(plain)
    _, m0 = _update(plain)
    _, m1 = _update(ckpt, gradient_checkpointing=True)
    assert ckpt.backbone.model.gradient_checkpointing
    assert not plain.backbone.model.gradient_checkpointing
    assert m1["loss"] == pytest.approx(m0["loss"], rel=1e-6)
    assert m1["grad_norm"] == pytest.approx(m0["grad_norm"], rel=1e-5)
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=n)


def test_bf16_weights_train_against_fp32_master_weights(default_tokenizer, tmp_path):
    lm = build_for_tokenizer(default_tokenizer, "sdar", seed=0, dtype=torch.bfloat16)
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    trainer, m = _update(lm)
    assert m["skipped"] == 0.0 and m["grad_norm"] > 0
    assert all(p.dtype == torch.bfloat16 for p in lm.parameters())
    assert trainer.master and all(mw.dtype == torch.float32 for _, mw in trainer.master)
    for st in trainer.optimizer.state.values():
        assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32
    # the weights are their master copies rounded to bf16, and they moved
    for p, mw in trainer.master:
        assert torch.equal(p.detach(), mw.to(torch.bfloat16))
    assert any(not torch.equal(before[n], p) for n, p in lm.named_parameters())
    # a restart restores the masters (sub-bf16 precision) when the weights still match
    trainer.save(tmp_path)
    again = Trainer(TokenScorer(lm), trainer.cfg)
    assert again.load(tmp_path)
    for (_, a), (_, b) in zip(trainer.master, again.master):
        assert torch.equal(a, b)
    with torch.no_grad():
        next(lm.parameters()).add_(1.0)  # weights changed since: masters restart from them
    third = Trainer(TokenScorer(lm), trainer.cfg)
    assert third.load(tmp_path)
    p0, m0 = third.master[0]
    assert torch.equal(m0, p0.detach().float())


def test_bad_devices_and_dtypes_are_one_clear_error():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="not a device name"):
        resolve_device("gpu0")
    with pytest.raises(DeviceError, match="runs on"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(DeviceError, match="model.dtype 'float16'"):
        resolve_dtype("float16")


def test_params_refuse_a_device_name_torch_does_not_know(tmp_path):
    from conftest import params_file
    from tracerl.config import ConfigError, load_params

    with pytest.raises(ConfigError, match="run.device 'gpu0' is not a device name"):
        load_params(params_file(tmp_path / "p.yaml", run={"device": "gpu0"}))
    assert load_params(params_file(tmp_path / "q.yaml", run={"device": "cuda:1"})).run.device


def test_stage_refuses_a_missing_device_before_any_work(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    from stages import policy as policy_stage
    from tests.test_stage_train import _params

    params = _params(tmp_path, run={"device": "cuda"})
    with pytest.raises(DeviceError, match="CUDA is not available"):
        policy_stage.main(["--params", str(params), "--policy", str(tmp_path / "nope"),
                           "--scored", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])


def test_training_stages_run_with_meta_as_default_device(tmp_path):
    """The stage code too (loading, saving, trainer state): SFT, value and policy stages
    with the default device on meta and ``run.device: cpu``."""
    from stages import policy as policy_stage
    from stages import sft as sft_stage
    from stages import value as value_stage
    from tests.test_stage_train import _params, _scored, _sft_data

    from tracerl.pipeline.artifacts import read_metrics

    params = _params(tmp_path, policy={"use_value": True}, sft={"steps": 1})
    data = _sft_data(tmp_path)
    with torch.device("meta"):
        assert sft_stage.main(["--params", str(params), "--input", f"data={data}",
                               "--out", str(tmp_path / "sft")]) == 0
    scored = _scored(tmp_path, tmp_path / "sft" / "checkpoint")
    with torch.device("meta"):
        assert value_stage.main(["--params", str(params), "--value", "none", "--policy",
                                 str(tmp_path / "sft"), "--scored", str(scored), "--out",
                                 str(tmp_path / "v0"), "--iteration", "0"]) == 0
        assert policy_stage.main(["--params", str(params), "--policy", str(tmp_path / "sft"),
                                  "--scored", str(scored), "--value-advantages",
                                  str(tmp_path / "v0"), "--out", str(tmp_path / "p0")]) == 0
    assert read_metrics(tmp_path / "p0")["steps"] >= 1
    assert read_metrics(tmp_path / "v0")["trained"] == 1.0
