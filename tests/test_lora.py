"""LoRA through peft (tracerl.models.lora): only adapters train, merged checkpoints load
unchanged and compute what the adapted model computed, digests follow the merged weights,
bad settings fail with every problem listed; and the sft / policy stages with LoRA on."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("peft", reason="peft is a pinned dependency (pyproject.toml); reinstall the env")

from test_stage_train import ROOT, TINY, _params, _scored, _sft_data  # noqa: E402
from tracerl.config import ConfigError, load_params  # noqa: E402
from tracerl.models import load_model, tiny_model, weights_digest  # noqa: E402
from tracerl.models.lora import (  # noqa: E402
    DEFAULT_TARGETS,
    LoraSpec,
    apply_lora,
    has_lora,
    parameter_report,
    save_trained,
)
from tracerl.pipeline.artifacts import read_metrics  # noqa: E402
from tracerl.rl import SFTConfig, TokenScorer, TrainConfig, Trainer, sft_train  # noqa: E402
from tracerl.rl.rows import TraceSample  # noqa: E402

# TINY: hidden 32, 2 heads of 16 (1 kv head), MLP 64, 2 layers. r * (in + out) per layer:
# q 32+32, k 32+16, v 32+16, o 32+32, gate 32+64, up 32+64, down 64+32 = 512 per unit rank
LORA_PER_RANK = 2 * 512


def _model():
    return tiny_model(seed=0, block_size=4, **TINY)


def _samples(n: int = 4) -> list[TraceSample]:
    return [TraceSample(prompt_ids=[5 + i, 6, 7], response_ids=[20 + i, 21, 22, 23],
                        decode_steps=None, response_len=4) for i in range(n)]


def _tokens(lm, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, lm.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))


def _randomize_adapters(lm, seed: int = 1) -> None:
    """Nonzero B (fresh adapters compute nothing: B = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_lora_sft_step_trains_only_the_adapters():
    lm, _ = _model()
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    apply_lora(lm, LoraSpec(rank=4, alpha=8.0))
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    trainer = Trainer(TokenScorer(lm), TrainConfig(lr=1e-2, micro_batch=4), kind="sft")
    sft_train(trainer, _samples(), SFTConfig(), steps=1)
    after = dict(lm.named_parameters())
    for n, p in after.items():
        if n in trainable:
            continue
        plain = n.replace(".base_layer.", ".")
        assert torch.equal(p, before[plain]), f"frozen base weight {n} changed"
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in after.items() if "lora_B" in n)
    # optimizer state only for the adapters: the hand-counted parameters, two fp32 moments
    report = parameter_report(trainer.module, trainer.optimizer)
    assert report["params/trainable"] == 4 * LORA_PER_RANK
    n_adapter_tensors = 2 * 2 * 7  # layers x targets x (A, B)
    assert report["optimizer/state_bytes"] == 2 * 4 * 4 * LORA_PER_RANK + 4 * n_adapter_tensors
    full = parameter_report(TokenScorer(_model()[0]))
    assert report["params/total"] == full["params/total"] + 4 * LORA_PER_RANK


def test_merged_checkpoint_gives_the_adapted_logits_and_digest(tmp_path):
    lm, tok = _model()
    digest0 = weights_digest(lm)
    spec = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj"))
    apply_lora(lm, spec)
    assert weights_digest(lm) == digest0  # fresh adapters (B = 0) change no bit
    _randomize_adapters(lm)
    lm.eval()
    ids = _tokens(lm)
    with torch.no_grad():
        adapted = lm(ids).logits
        plain = _model()[0](ids).logits
    assert (adapted - plain).abs().max() > 1e-3  # the adapters matter
    digest = weights_digest(lm)
    assert digest != digest0
    save_trained(lm, tok, tmp_path, spec)
    assert not has_lora(lm)
    assert weights_digest(lm) == digest  # merged in place: the same weights
    loaded, _ = load_model(tmp_path / "checkpoint")
    assert weights_digest(loaded) == digest  # what rollouts record = what the adapted model was
    with torch.no_grad():
        merged = loaded(ids).logits
    assert (merged - adapted).abs().max() <= 1e-5
    # the adapter folder loads with peft onto the base weights
    from peft import PeftModel

    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and sorted(cfg["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    base, _ = _model()
    base.backbone = PeftModel.from_pretrained(base.backbone, str(tmp_path / "adapter")).base_model.model
    base.eval()
    with torch.no_grad():
        via_peft = base(ids).logits
    assert (via_peft - adapted).abs().max() <= 1e-5


def test_bad_targets_are_named_against_the_model():
    lm, _ = _model()
    with pytest.raises(ValueError) as e:
        apply_lora(lm, LoraSpec(rank=4, target_modules=("q_proj", "qkv_proj", "c_attn")),
                   where="sft.lora")
    msg = str(e.value)
    assert "['qkv_proj', 'c_attn']" in msg and "sft.lora.target_modules" in msg
    for name in DEFAULT_TARGETS:
        assert name in msg  # the model's own layer names, to pick from
    assert not has_lora(lm)
    with pytest.raises(ValueError, match="rank is 0"):
        apply_lora(lm, LoraSpec(rank=0))


def test_bad_lora_params_list_every_problem():
    over = {"sft": {"zero_stage": 3, "lora": {"rank": 8}},
            "policy": {"lora": {"rank": -1, "alpha": 0, "dropout": 1.0, "target_modules": []}}}
    with pytest.raises(ConfigError) as e:
        load_params(ROOT / "params.yaml", over)
    probs = e.value.problems
    assert any("sft.lora.rank > 0 with sft.zero_stage 3" in p for p in probs)
    assert any("policy.lora.rank must be >= 0" in p for p in probs)
    assert any("policy.lora.alpha must be > 0" in p for p in probs)
    assert any("policy.lora.dropout must be in [0, 1)" in p for p in probs)
    assert any("policy.lora.target_modules is empty" in p for p in probs)
    with pytest.raises(ConfigError, match=r"sft.lora.target_modules \['qkv'\] are not linear "
                       r"layers .* choose among \['q_proj'"):
        load_params(ROOT / "params.yaml", {"sft": {"lora": {"target_modules": ["q_proj", "qkv"]}}})
    with pytest.raises(ConfigError, match="unknown key 'policy.lora.ranks'"):
        load_params(ROOT / "params.yaml", {"policy": {"lora": {"ranks": 4}}})


def test_policy_update_with_lora_changes_the_merged_weights(tmp_path):
    from stages import policy as policy_stage
    from stages import sft as sft_stage

    lora = {"rank": 4, "alpha": 8.0}
    params = _params(tmp_path, sft={"steps": 1}, policy={"lora": lora})
    assert sft_stage.main(["--params", str(params), "--input", f"data={_sft_data(tmp_path)}",
                           "--out", str(tmp_path / "sft")]) == 0
    sm = read_metrics(tmp_path / "sft")  # full fine-tuning: every parameter trains
    assert sm["params/trainable"] == sm["params/total"]
    scored = _scored(tmp_path, tmp_path / "sft" / "checkpoint")
    # no reference given: fresh adapters on the input policy's weights
    assert policy_stage.main(["--params", str(params), "--policy", str(tmp_path / "sft"),
                              "--scored", str(scored), "--out", str(tmp_path / "p0")]) == 0
    pm = read_metrics(tmp_path / "p0")
    assert pm["lora/continued"] == 0.0 and pm["lora/base_is_reference"] == 0.0
    # the adapted policy digests as the weights the rollout recorded: log-probs reused
    assert pm["old_logprobs_recorded"] == 1.0
    assert pm["params/trainable"] == 4 * LORA_PER_RANK
    assert pm["optimizer/state_bytes"] == 2 * 4 * 4 * LORA_PER_RANK + 4 * 28
    sft_w = load_model(tmp_path / "sft" / "checkpoint")[0]
    p0_w = load_model(tmp_path / "p0" / "checkpoint")[0]
    assert weights_digest(p0_w) != weights_digest(sft_w)
    changed = {n for n, p in p0_w.state_dict().items() if not torch.equal(p, sft_w.state_dict()[n])}
    assert changed and all(n.rsplit(".", 2)[-2] in DEFAULT_TARGETS for n in changed)
    assert (tmp_path / "p0" / "adapter" / "adapter_model.safetensors").is_file()
    # the next update resumes schedule and counters, with fresh adapters and moments
    assert policy_stage.main(["--params", str(params), "--input", f"policy={tmp_path / 'p0'}",
                              "--input", f"scored={scored}", "--out", str(tmp_path / "p1"),
                              "--iteration", "1"]) == 0
    p1 = read_metrics(tmp_path / "p1")
    assert p1["resumed"] == 1.0
    assert p1["trainer/optimizer_steps"] == 2 * pm["trainer/optimizer_steps"]
    assert p1["optimizer/state_bytes"] == pm["optimizer/state_bytes"]


def test_value_stage_with_lora_trains_adapters_and_head(tmp_path):
    from stages import sft as sft_stage
    from stages import value as value_stage

    from tracerl.models import ValueModel

    # the head starts at zero, so the first step trains it alone (no gradient reaches the
    # backbone through a zero head): three epochs, so the adapters train too
    params = _params(tmp_path, sft={"steps": 1}, value={"lora": {"rank": 2, "alpha": 4.0},
                                                        "lr": 1e-2, "epochs": 3})
    assert sft_stage.main(["--params", str(params), "--input", f"data={_sft_data(tmp_path)}",
                           "--out", str(tmp_path / "sft")]) == 0
    scored = _scored(tmp_path, tmp_path / "sft" / "checkpoint")
    assert value_stage.main(["--params", str(params), "--value", "none", "--policy",
                             str(tmp_path / "sft"), "--scored", str(scored),
                             "--out", str(tmp_path / "v0")]) == 0
    vm = read_metrics(tmp_path / "v0")
    assert vm["trained"] == 1.0
    assert vm["params/trainable"] == 2 * LORA_PER_RANK + TINY["hidden_size"]  # + the head
    assert (tmp_path / "v0" / "adapter" / "adapter_config.json").is_file()
    v = ValueModel.load(tmp_path / "v0" / "checkpoint")
    sft_w = load_model(tmp_path / "sft" / "checkpoint")[0].state_dict()
    changed = {n for n, p in v.lm.state_dict().items() if not torch.equal(p, sft_w[n])}
    assert changed and all(n.rsplit(".", 2)[-2] in DEFAULT_TARGETS for n in changed)
    assert v.head.weight.abs().sum() > 0
    # the next iteration resumes the value trainer (schedule, counters), fresh adapters
    assert value_stage.main(["--params", str(params), "--input", f"value={tmp_path / 'v0'}",
                             "--input", f"policy={tmp_path / 'sft'}", "--input",
                             f"scored={scored}", "--out", str(tmp_path / "v1"),
                             "--iteration", "1"]) == 0
    assert read_metrics(tmp_path / "v1")["resumed"] == 1.0


def _ref_logprobs(lm, samples, beta_cfg, **kw):
    from tracerl.rl import PolicyConfig
    from tracerl.rl.policy import prepare_policy_rows

    trainer = Trainer(TokenScorer(lm), TrainConfig(lr=1e-3, micro_batch=2), kind="policy")
    # random masking: rows need no decoding trajectory (the reference is method-blind)
    cfg = PolicyConfig(method="random_masking", beta=beta_cfg, kl_target="reference")
    rows, _ = prepare_policy_rows(trainer, samples, cfg, **kw)
    return [r.tokens["ref_logprobs"] for r in rows], [r.tokens["old_logprobs"] for r in rows]


def test_kl_reference_is_the_model_with_adapters_off():
    """The reference log-probs of an adapted model with its adapters switched off equal
    those of a separate copy of the base weights; the adapters are back on afterwards."""
    base, _ = _model()
    lm, _ = _model()
    apply_lora(lm, LoraSpec(rank=4, alpha=8.0))
    _randomize_adapters(lm)
    samples = [TraceSample(prompt_ids=s.prompt_ids, response_ids=s.response_ids,
                           decode_steps=None, response_len=4, attention="block", block_size=4,
                           advantage=1.0) for s in _samples()]
    off, old = _ref_logprobs(lm, samples, 0.1, ref_adapters_off=True)
    copy, _ = _ref_logprobs(lm, samples, 0.1, ref_model=base)
    for a, b in zip(off, copy):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # the adapted policy (old log-probs, scored with adapters on) differs from the reference
    assert max(float((a - b).abs().max()) for a, b in zip(old, off)) > 1e-3
    assert all(p.requires_grad for n, p in lm.named_parameters() if "lora_" in n)
    ids = _tokens(lm)
    with torch.no_grad():
        on = lm.backbone(input_ids=ids).logits
        ref = base.backbone(input_ids=ids).logits
    assert not torch.allclose(on, ref, atol=1e-4)  # adapters on again


def test_lora_policy_trains_one_adapter_on_the_reference(tmp_path):
    """With the reference given, iteration 0 puts fresh adapters on it, iteration 1 loads
    that adapter back onto the same weights with its optimizer moments and trains on; the
    merged checkpoint equals reference + the saved adapter; KL to the reference needs no
    second copy (the base with adapters off), and is zero at the first step."""
    from stages import policy as policy_stage
    from stages import sft as sft_stage

    from tracerl.models.lora import adapter_base_digest, load_adapter

    lora = {"rank": 4, "alpha": 8.0}
    params = _params(tmp_path, sft={"steps": 1},
                     policy={"lora": lora, "beta": 0.5, "kl_target": "reference"})
    assert sft_stage.main(["--params", str(params), "--input", f"data={_sft_data(tmp_path)}",
                           "--out", str(tmp_path / "sft")]) == 0
    scored = _scored(tmp_path, tmp_path / "sft" / "checkpoint")
    ref = ["--reference", str(tmp_path / "sft")]
    assert policy_stage.main(["--params", str(params), "--policy", str(tmp_path / "sft"),
                              "--scored", str(scored), "--out", str(tmp_path / "p0"), *ref]) == 0
    p0 = read_metrics(tmp_path / "p0")
    assert p0["lora/continued"] == 0.0 and p0["lora/base_is_reference"] == 1.0
    assert p0["kl"] == pytest.approx(0.0, abs=1e-7)  # fresh adapters: the policy is the reference
    sft_w = load_model(tmp_path / "sft" / "checkpoint")[0]
    assert adapter_base_digest(tmp_path / "p0" / "adapter") == weights_digest(sft_w)
    scored1 = _scored(tmp_path, tmp_path / "p0" / "checkpoint", name="reward1")
    assert policy_stage.main(["--params", str(params), "--input", f"policy={tmp_path / 'p0'}",
                              "--input", f"scored={scored1}", "--out", str(tmp_path / "p1"),
                              "--iteration", "1", *ref]) == 0
    p1 = read_metrics(tmp_path / "p1")
    assert p1["lora/continued"] == 1.0 and p1["lora/base_is_reference"] == 1.0
    assert p1["resumed"] == 1.0
    assert p1["old_logprobs_recorded"] == 1.0  # the continued model digests as p0's checkpoint
    assert p1["kl"] > 0  # the policy has moved away from the reference
    # p1's merged weights are the reference plus p1's adapter (one adapter, trained on)
    rebuilt = load_model(tmp_path / "sft" / "checkpoint")[0]
    apply_lora(rebuilt, LoraSpec(rank=4, alpha=8.0))
    load_adapter(rebuilt, tmp_path / "p1" / "adapter")
    p1_w = load_model(tmp_path / "p1" / "checkpoint")[0]
    assert weights_digest(rebuilt) == weights_digest(p1_w)
    p0_ad = load_model(tmp_path / "sft" / "checkpoint")[0]
    apply_lora(p0_ad, LoraSpec(rank=4, alpha=8.0))
    load_adapter(p0_ad, tmp_path / "p0" / "adapter")
    assert weights_digest(p0_ad) == weights_digest(load_model(tmp_path / "p0" / "checkpoint")[0])
    assert weights_digest(p0_ad) != weights_digest(p1_w)
    # AdamW's moments of iteration 0 were restored (continued), not started afresh: the
    # per-parameter step count goes on from p0's
    from tracerl.rl.trainer import STATE_FILE

    def adam_steps(d):
        opt = torch.load(d / "trainer_state" / STATE_FILE, weights_only=False)["optimizer"]
        return {float(v["step"]) for v in opt["state"].values()}

    assert adam_steps(tmp_path / "p0") == {p0["trainer/optimizer_steps"]}
    assert adam_steps(tmp_path / "p1") == {p1["trainer/optimizer_steps"]}
    assert p1["trainer/optimizer_steps"] > p0["trainer/optimizer_steps"]
