"""The trainer: one update on the tiny model, persistent optimizer state, NaN guard,
recorded old log-probs, baselines, value model and SFT."""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch

from tracerl.models import ValueModel, build_for_tokenizer, weights_digest
from tracerl.rl import (
    PolicyConfig,
    SFTConfig,
    TokenScorer,
    TraceSample,
    TrainConfig,
    Trainer,
    ValueConfig,
    ValueScorer,
    evaluate_policy_loss,
    policy_loss_factory,
    policy_update,
    prepare_policy_rows,
    sft_train,
    train_rows,
    trajectory_logprobs,
    value_update,
)


def make_samples(n: int, seed: int = 0, b: int = 4, steps_per_block: int = 4,
                 advantages=None, attention: str = "block") -> list[TraceSample]:
    """Synthetic trajectories: prompts of 3..8 tokens, responses to the end of a block,
    per-block step maps like a sampler's (1..T contiguous steps, increasing across blocks)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        P = int(torch.randint(3, 9, (1,), generator=g))
        R = 12 - P % b
        prompt = torch.randint(4, 90, (P,), generator=g).tolist()
        resp = torch.randint(4, 90, (R,), generator=g).tolist()
        steps, s, j = [], 0, 0
        while j < R:
            n_b = b - (P + j) % b
            t = min(n_b, steps_per_block)
            k = torch.cat([torch.arange(t), torch.randint(0, t, (n_b - t,), generator=g)])
            steps += (s + 1 + k[torch.randperm(n_b, generator=g)]).tolist()
            s, j = s + t, j + n_b
        adv = advantages[i] if advantages else (1.0 if i % 2 == 0 else -1.0)
        rlen = int(torch.randint(R - 3, R + 1, (1,), generator=g))
        out.append(TraceSample(prompt, resp, steps, rlen, advantage=adv, sample_id=f"s{i}",
                               attention=attention, block_size=b))
    return out


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_one_update_changes_every_parameter_and_lowers_loss(tiny_sdar):
    model, _ = tiny_sdar
    samples = make_samples(4)
    cfg = PolicyConfig(shuffle=False)
    trainer = Trainer(TokenScorer(model), TrainConfig(lr=1e-3, micro_batch=2, grad_accum=2))
    rows, info = prepare_policy_rows(trainer, samples, cfg)
    assert info["old_logprobs_recorded"] == 0.0  # no rollout log-probs: recomputed
    L = max(s.response_len for s in samples)
    before_loss = evaluate_policy_loss(trainer, rows, cfg, L)
    # old = new: loss = -sum(A m) / tokens
    tok = sum(r.num_targets for r in rows)
    want = -sum(float(r.tokens["advantages"].sum()) for r in rows) / tok
    assert before_loss == pytest.approx(want, abs=1e-5)
    before = _params(trainer.module)
    hist = train_rows(trainer, rows, policy_loss_factory(cfg, L), model.tokens.pad_id, shuffle=False)
    assert len(hist) == 1 and hist[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    for k in ("loss", "policy_loss", "kl", "clip_fraction", "ratio_max", "grad_norm", "entropy",
              "tokens_per_s"):
        assert k in hist[0]
    after = _params(trainer.module)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, f"parameters not updated: {unchanged}"
    assert evaluate_policy_loss(trainer, rows, cfg, L) < before_loss - 1e-4


def test_trainer_state_persists_across_save_and_load(tiny_sdar, tmp_path):
    model, _ = tiny_sdar
    samples = make_samples(6, seed=1)
    tc = TrainConfig(lr=1e-3, micro_batch=2, warmup_steps=2, schedule="cosine", total_steps=10)
    pc = PolicyConfig()
    a = Trainer(TokenScorer(model), tc)
    policy_update(a, samples, pc)  # 3 optimizer steps
    assert a.counters["optimizer_steps"] == 3 and a.scheduler.last_epoch == 3
    a.save(tmp_path / "state")
    b = Trainer(TokenScorer(copy.deepcopy(model)), tc)
    assert b.load(tmp_path / "state")
    assert b.counters == a.counters and b.scheduler.last_epoch == 3
    assert b.optimizer.param_groups[0]["lr"] == pytest.approx(a.optimizer.param_groups[0]["lr"])
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)
    # continuing in-process and continuing after a restart give the same next update
    more = make_samples(4, seed=2)
    policy_update(a, more, pc)
    policy_update(b, more, pc)
    pa, pb = _params(a.module), _params(b.module)
    assert all(torch.allclose(pa[n], pb[n], atol=1e-6) for n in pa)
    # a state of another kind is not resumed
    c = Trainer(TokenScorer(copy.deepcopy(model)), tc, kind="value")
    assert not c.load(tmp_path / "state")


def test_non_finite_gradients_skip_the_step(tiny_sdar, caplog):
    model, _ = tiny_sdar
    trainer = Trainer(TokenScorer(model), TrainConfig(lr=1e-3, micro_batch=8))
    rows, _ = prepare_policy_rows(trainer, make_samples(2), PolicyConfig())
    from tracerl.rl import collate

    batch = collate(rows, model.tokens.pad_id)
    before = _params(trainer.module)

    def nan_loss(out, b):
        return out[0].sum() * float("nan"), {"tokens": float(b.num_targets)}

    with caplog.at_level(logging.WARNING):
        m = trainer.step([batch], nan_loss)
    assert m["skipped"] == 1.0 and trainer.counters["skipped_steps"] == 1
    assert trainer.counters["optimizer_steps"] == 0 and trainer.scheduler.last_epoch == 0
    assert "skipped" in caplog.text
    after = _params(trainer.module)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(p.grad is None for p in trainer.module.parameters())


def test_recorded_old_logprobs_used_when_weights_match(tiny_sdar):
    model, _ = tiny_sdar
    base = make_samples(3)
    lps = trajectory_logprobs(model, base)
    digest = weights_digest(model)

    def with_lp(pid):
        out = []
        for s, lp in zip(base, lps):
            full = lp.tolist() + [0.0] * (len(s.response_ids) - s.response_len)
            out.append(dataclasses.replace(s, logprobs=full, policy_id=pid))
        return out

    trainer = Trainer(TokenScorer(model), TrainConfig(lr=1e-3))
    rows, info = prepare_policy_rows(trainer, with_lp(digest), PolicyConfig())
    assert info["old_logprobs_recorded"] == 1.0
    rows2, info2 = prepare_policy_rows(trainer, with_lp("other-weights"), PolicyConfig())
    assert info2["old_logprobs_recorded"] == 0.0
    for r, r2 in zip(rows, rows2):  # recorded == recomputed for the same weights
        assert torch.allclose(r.tokens["old_logprobs"], r2.tokens["old_logprobs"], atol=1e-4)


def test_empty_batch_is_a_logged_skip(tiny_sdar, caplog):
    model, _ = tiny_sdar
    trainer = Trainer(TokenScorer(model), TrainConfig(lr=1e-3))
    before = _params(trainer.module)
    with caplog.at_level(logging.WARNING):
        m = policy_update(trainer, [], PolicyConfig())
    assert m["empty_batch"] == 1.0 and m["steps"] == 0.0 and "no trainable rows" in caplog.text
    too_long = policy_update(trainer, make_samples(2), PolicyConfig(max_len=5))
    assert too_long["rows/skipped_too_long"] == 2.0 and too_long["empty_batch"] == 1.0
    assert all(torch.equal(before[n], p) for n, p in trainer.module.named_parameters())


@pytest.mark.parametrize("method", ["random_masking", "coupled"])
def test_baselines_and_reference_kl(tiny_sdar, method):
    model, _ = tiny_sdar
    trainer = Trainer(TokenScorer(model), TrainConfig(lr=1e-3, micro_batch=4))
    ref = copy.deepcopy(model)
    m = policy_update(trainer, make_samples(4), PolicyConfig(method=method, beta=0.1,
                                                             kl_target="reference"), ref_model=ref)
    assert m["steps"] == 1.0 and m["old_logprobs_recorded"] == 0.0
    assert m["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference equals the pre-update policy
    with pytest.raises(ValueError, match="reference model"):
        policy_update(trainer, make_samples(2), PolicyConfig(beta=0.1, kl_target="reference"))
    with pytest.raises(ValueError, match="valid: trace_rl"):
        policy_update(trainer, make_samples(2), PolicyConfig(method="grpo"))


def test_full_attention_update_and_bf16_checkpointing(default_tokenizer):
    lm = build_for_tokenizer(default_tokenizer, "llada", seed=0)
    tc = TrainConfig(lr=1e-3, micro_batch=8, bf16=True, gradient_checkpointing=True)
    trainer = Trainer(TokenScorer(lm), tc)
    m = policy_update(trainer, make_samples(2, attention="full"), PolicyConfig(shrink=2))
    assert m["steps"] >= 1 and m["grad_norm"] > 0 and m["skipped"] == 0.0
    assert lm.backbone.model.gradient_checkpointing


def test_value_update_gae_and_regression(tiny_sdar):
    model, _ = tiny_sdar
    vm = ValueModel.from_policy(model)
    trainer = Trainer(ValueScorer(vm), TrainConfig(lr=1e-2, micro_batch=4))
    samples = make_samples(4, advantages=[1.0, -1.0, 0.5, 0.0])
    before = _params(trainer.module)
    advs, rets, m = value_update(trainer, samples, ValueConfig())
    # zero-initialised head: V = 0, so with gamma = lam = 1 every token's A = R = advantage
    for s, a, r in zip(samples, advs, rets):
        assert len(a) == s.response_len
        assert a == pytest.approx([s.advantage] * s.response_len)
        assert r == pytest.approx([s.advantage] * s.response_len)
    assert m["value_loss"] > 0 and "explained_var" in m
    assert not torch.equal(before["vm.head.weight"], trainer.module.vm.head.weight)
    # after training, values move towards the returns: a second pass has lower loss
    _, _, m2 = value_update(trainer, samples, ValueConfig())
    assert m2["value_loss"] < m["value_loss"]
    # token advantages flow into the policy update
    tok = [dataclasses.replace(s, advantage=0.0, token_advantages=a)
           for s, a in zip(samples, advs)]
    pt = Trainer(TokenScorer(model), TrainConfig(lr=1e-3))
    rows, _ = prepare_policy_rows(pt, tok, PolicyConfig())
    assert torch.equal(rows[0].tokens["advantages"],
                       torch.tensor(advs[0])[rows[0].resp_pos])


@pytest.mark.parametrize("family,method", [("sdar", "semi_ar"), ("sdar", "trace"),
                                           ("llada", "random_masking"), ("llada", "semi_ar"),
                                           ("dream", "trace")])
def test_sft_objectives_learn(default_tokenizer, family, method):
    lm = build_for_tokenizer(default_tokenizer, family, seed=0)
    data = make_samples(4, seed=3)
    trainer = Trainer(TokenScorer(lm), TrainConfig(lr=1e-2, micro_batch=4), kind="sft")
    cfg = SFTConfig(method=method, mask_times=2, decode_block=4)
    first = sft_train(trainer, data, cfg, steps=1)
    sft_train(trainer, data, cfg, steps=6)
    last = sft_train(trainer, data, cfg, steps=1)
    assert last["nll"] < first["nll"]
    assert trainer.counters["optimizer_steps"] == 8


def test_sft_stops_when_validation_reaches_the_threshold(default_tokenizer):
    """validate every 2 steps; accuracies 0.1, 0.4, 0.9: with stop_at 0.35 the run ends
    after step 4 (the second validation), not at its 10 steps; a resumed run whose
    progress says stopped takes no more steps."""
    from tracerl.rl.sft import SFTProgress

    lm = build_for_tokenizer(default_tokenizer, "sdar", seed=0)
    trainer = Trainer(TokenScorer(lm), TrainConfig(lr=1e-3, micro_batch=2), kind="sft")
    seen, accs = [], iter([0.1, 0.4, 0.9])

    def validate(step):
        seen.append(step)
        return next(accs)

    saved = []
    m = sft_train(trainer, make_samples(4, seed=1), SFTConfig(), steps=10, validate=validate,
                  validate_every=2, stop_at=0.35, checkpoint_every=1,
                  on_checkpoint=lambda st: saved.append(copy.deepcopy(st)))
    assert seen == [2, 4]
    assert trainer.counters["optimizer_steps"] == 4 and m["steps"] == 4.0
    assert (m["val_accuracy"], m["val_step"], m["stopped_early"]) == (0.4, 4.0, 1.0)
    assert saved[-1].stopped and saved[-1].validation == [[2.0, 0.1], [4.0, 0.4]]
    resumed = SFTProgress(**copy.deepcopy(saved[-1].__dict__))
    sft_train(trainer, make_samples(4, seed=1), SFTConfig(), steps=10, resume=resumed,
              validate=validate, validate_every=2, stop_at=0.35)
    assert trainer.counters["optimizer_steps"] == 4 and seen == [2, 4]
    # without a threshold every step runs, validating at 2, 4, ..
    t2 = Trainer(TokenScorer(build_for_tokenizer(default_tokenizer, "sdar", seed=0)),
                 TrainConfig(lr=1e-3, micro_batch=2), kind="sft")
    m2 = sft_train(t2, make_samples(4, seed=1), SFTConfig(), steps=5,
                   validate=lambda step: step / 10, validate_every=2)
    assert m2["steps"] == 5.0 and (m2["val_step"], m2["stopped_early"]) == (4.0, 0.0)
    # reaching the threshold at the last step is a full run, not an early stop
    t3 = Trainer(TokenScorer(build_for_tokenizer(default_tokenizer, "sdar", seed=0)),
                 TrainConfig(lr=1e-3, micro_batch=2), kind="sft")
    m3 = sft_train(t3, make_samples(4, seed=1), SFTConfig(), steps=4,
                   validate=lambda step: step / 10, validate_every=2, stop_at=0.3)
    assert m3["steps"] == 4.0 and (m3["val_accuracy"], m3["stopped_early"]) == (0.4, 0.0)


def test_sft_method_must_fit_the_family(default_tokenizer):
    full = Trainer(TokenScorer(build_for_tokenizer(default_tokenizer, "llada")),
                   TrainConfig(lr=1e-3), kind="sft")
    with pytest.raises(ValueError, match="decoding block size"):  # semi_ar needs its block
        sft_train(full, make_samples(1), SFTConfig(method="semi_ar"), steps=1)
    block = Trainer(TokenScorer(build_for_tokenizer(default_tokenizer, "sdar")),
                    TrainConfig(lr=1e-3), kind="sft")
    with pytest.raises(ValueError, match="for full-attention models"):
        sft_train(block, make_samples(1), SFTConfig(method="random_masking"), steps=1)


def test_value_model_on_a_full_attention_model(default_tokenizer):
    """The reference supports value models for block models only; here a LLaDA-style
    (bidirectional) model gets one too: values for every response token, GAE advantages
    equal to the sequence advantage at a zero-initialised head, and training lowers the
    value loss."""
    lm = build_for_tokenizer(default_tokenizer, "llada", seed=0)
    trainer = Trainer(ValueScorer(ValueModel.from_policy(lm)), TrainConfig(lr=1e-2, micro_batch=4))
    samples = make_samples(4, advantages=[1.0, -1.0, 0.5, 0.0], attention="full")
    advs, rets, m = value_update(trainer, samples, ValueConfig())
    for s, a in zip(samples, advs):
        assert a == pytest.approx([s.advantage] * s.response_len)
    assert m["rows/block_size"] == 0.0  # full attention: ranks over the whole response
    _, _, m2 = value_update(trainer, samples, ValueConfig())
    assert m2["value_loss"] < m["value_loss"]
