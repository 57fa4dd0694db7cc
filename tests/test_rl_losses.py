"""Losses and step-level GAE on hand-derived tensors."""

from __future__ import annotations

import math

import pytest
import torch

from tracerl.rl import (
    explained_variance,
    kl_penalty,
    outcome_token_rewards,
    sft_loss,
    step_gae,
    trace_rl_loss,
    value_loss,
)

A = torch.tensor([[1.5, 1.5, 1.5, 1.5], [-0.5, -0.5, -0.5, -0.5]])
MASK = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])


def test_old_equals_new_closed_form():
    lp = torch.randn(2, 4)
    # reference normalisation: -(1/B) sum_n A_n |m_n| / L = -(1/2)(1.5*2/4 - 0.5*3/4) = -0.1875
    loss, m = trace_rl_loss(lp, lp.clone(), A, MASK, normalize="padded", beta=0.05)
    assert loss.item() == pytest.approx(-0.1875, abs=1e-7)  # k3 KL at d = 0 is 0
    assert m["ratio_mean"] == pytest.approx(1.0) and m["clip_fraction"] == 0.0 and m["kl"] == 0.0
    # token normalisation: -(1.5*2 - 0.5*3) / 5 = -0.3
    loss, _ = trace_rl_loss(lp, lp.clone(), A, MASK, normalize="tokens")
    assert loss.item() == pytest.approx(-0.3, abs=1e-7)
    # global normalisers: the same tensors as one of two micro-batches of a 4-row step
    loss, _ = trace_rl_loss(lp, lp.clone(), A, MASK, normalize="padded", num_rows=4, padded_len=8)
    assert loss.item() == pytest.approx(-(1.5 * 2 - 0.5 * 3) / (4 * 8), abs=1e-7)


def _grad(log_ratio: float, adv: float, eps: float = 0.2) -> float:
    lp = torch.tensor([[log_ratio]], requires_grad=True)
    loss, _ = trace_rl_loss(lp, torch.zeros(1, 1), torch.tensor([[adv]]), torch.ones(1, 1), eps=eps)
    loss.backward()
    return lp.grad.item()


def test_clipped_objective_gradient():
    # rho = e^0.5 = 1.6487 > 1.2 with A > 0: min(rho A, 1.2 A) = 1.2 A, constant -> 0
    assert _grad(0.5, 1.0) == 0.0
    # rho = e^-0.5 = 0.6065 < 0.8 with A < 0: min(-0.6065, -0.8) = -0.8, constant -> 0
    assert _grad(-0.5, -1.0) == 0.0
    # inside the region: d(-rho A)/dl = -rho A = -e^0.1
    assert _grad(0.1, 1.0) == pytest.approx(-math.exp(0.1), rel=1e-6)
    # outside, on the unclipped side (rho > 1+eps, A < 0): min(-1.6487, -1.2) = rho A, grad -rho A
    assert _grad(0.5, -1.0) == pytest.approx(math.exp(0.5), rel=1e-6)


def test_clip_fraction_and_ratio_metrics():
    lp = torch.tensor([[0.5, 0.1, -0.5, 0.0]])
    _, m = trace_rl_loss(lp, torch.zeros(1, 4), torch.tensor([[1.0, 1.0, -1.0, 1.0]]),
                         torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    # clipped: token 0 (rho 1.65, A>0) and token 2 (rho 0.61, A<0); token 3 is not trained
    assert m["clip_fraction"] == pytest.approx(2 / 3)
    assert m["ratio_max"] == pytest.approx(math.exp(0.5), rel=1e-6)
    assert m["ratio_mean"] == pytest.approx((math.exp(0.5) + math.exp(0.1) + math.exp(-0.5)) / 3)


def test_kl_estimators_and_reference_target():
    lp, ref = torch.tensor([0.0]), torch.tensor([math.log(0.5)])
    # d = log 2: k1 = 0.6931; k3 = e^-d - 1 + d = 0.5 - 1 + 0.6931 = 0.1931
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(0.5 - 1 + math.log(2))
    # KL towards a reference model: beta * k3 / tokens adds to the policy loss
    loss, m = trace_rl_loss(lp[None], lp[None], torch.zeros(1, 1), torch.ones(1, 1), beta=0.1,
                            ref_logprobs=ref[None])
    assert loss.item() == pytest.approx(0.1 * (0.5 - 1 + math.log(2)), rel=1e-6)
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(lp, ref, "k2")


def test_value_loss_hand_derived():
    v = torch.tensor([[1.0, 0.2]])
    old = torch.tensor([[0.5, 0.5]])
    ret = torch.tensor([[0.0, 1.0]])
    # token 0: v_clip = 0.5 + 0.2 = 0.7; max((1-0)^2, (0.7-0)^2) = 1    -> 0.5
    # token 1: v_clip = 0.5 - 0.2 = 0.3; max((0.2-1)^2, (0.3-1)^2) = 0.64 -> 0.32
    loss, m = value_loss(v, old, ret, torch.ones(1, 2), clip=0.2)
    assert loss.item() == pytest.approx((0.5 + 0.32) / 2)
    assert m["value_clip_fraction"] == 0.0  # the unclipped loss is the larger one both times


def test_sft_loss_and_explained_variance():
    lp = torch.log(torch.tensor([[0.5, 0.25, 0.1]]))
    loss, m = sft_loss(lp, torch.tensor([[1.0, 1.0, 0.0]]))
    assert loss.item() == pytest.approx(-(math.log(0.5) + math.log(0.25)) / 2)
    assert explained_variance(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert explained_variance(torch.zeros(3), torch.tensor([1.0, 2.0, 3.0])) == 0.0


def step_gae_per_sample(rewards, values, steps, gamma, lam):
    """The former per-sample implementation (one response, a Python loop over its steps),
    kept here as the oracle of the batched :func:`step_gae`."""
    r, v = rewards.double(), values.double()
    uniq, rank = torch.unique(steps, sorted=True, return_inverse=True)
    S = len(uniq)
    cnt = torch.bincount(rank, minlength=S).double()
    r_step = torch.zeros(S, dtype=torch.float64).index_add_(0, rank, r) / cnt
    v_step = torch.zeros(S, dtype=torch.float64).index_add_(0, rank, v) / cnt
    V_next = torch.cat([v_step[1:], torch.zeros(1, dtype=torch.float64)])
    R_star = torch.zeros(S + 1, dtype=torch.float64)
    A_star = torch.zeros(S + 1, dtype=torch.float64)
    for i in range(S - 1, -1, -1):
        R_star[i] = r_step[i] + gamma * R_star[i + 1]
        A_star[i] = r_step[i] - v_step[i] + gamma * V_next[i] + gamma * lam * A_star[i + 1]
    returns = r + gamma * R_star[1:][rank]
    adv = r - v + gamma * V_next[rank] + gamma * lam * A_star[1:][rank]
    return returns.float(), adv.float()


def test_gae_batch_hand_worked():
    # gamma = 0.9, lam = 0.8 (gamma * lam = 0.72); three responses padded to L = 4.
    # Sample 0: tokens j0, j1 at step 1, j2 at step 2, j3 at step 3; outcome reward 1.
    #   step means: r* = [0, 0, 1], V* = [0.3, 0.5, 0.6]
    #   A*_2 = 1 - 0.6 = 0.4;  R*_2 = 1
    #   A*_1 = 0 - 0.5 + 0.9*0.6 + 0.72*0.4 = 0.328;  R*_1 = 0.9
    #   j0: A = 0 - 0.2 + 0.9*V*_1 + 0.72*A*_1 = -0.2 + 0.45 + 0.23616 = 0.48616; R = 0.9*R*_1 = 0.81
    #   j1: A = -0.4 + 0.45 + 0.23616 = 0.28616, R = 0.81
    #   j2: A = 0 - 0.5 + 0.9*0.6 + 0.72*0.4 = 0.328; R = 0.9
    #   j3: A = 1 - 0.6 = 0.4; R = 1
    # Sample 1: 2 tokens (then padding), steps [7, 4] (ranks 1, 0), reward -1 on step 7.
    #   step order u = [4, 7]: r* = [0, -1], V* = [0.5, 0.1]
    #   A*_1 = -1 - 0.1 = -1.1; R*_1 = -1
    #   token step 7: A = -1 - 0.1 = -1.1, R = -1
    #   token step 4: A = 0 - 0.5 + 0.9*0.1 + 0.72*(-1.1) = -0.41 - 0.792 = -1.202; R = 0.9*-1 = -0.9
    # Sample 2: 3 tokens all at step 2 (one step), process rewards [0.3, 0, 0.6], V = [0, 0.2, 0.1]:
    #   no later step, so A_j = r_j - V_j = [0.3, -0.2, 0.5], R_j = r_j.
    steps = torch.tensor([[1, 1, 2, 3], [7, 4, 0, 0], [2, 2, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    outcome = outcome_token_rewards(torch.tensor([1.0, -1.0, 0.0]), steps, mask)
    assert outcome.tolist() == [[0, 0, 0, 1], [-1, 0, 0, 0], [0, 0, 0, 0]]
    r = outcome.clone()
    r[2, :3] = torch.tensor([0.3, 0.0, 0.6])
    V = torch.tensor([[0.2, 0.4, 0.5, 0.6], [0.1, 0.5, 9.0, 9.0], [0.0, 0.2, 0.1, 9.0]])
    ret, adv = step_gae(r, V, steps, mask, gamma=0.9, lam=0.8)
    assert adv[0].tolist() == pytest.approx([0.48616, 0.28616, 0.328, 0.4], abs=1e-6)
    assert adv[1].tolist() == pytest.approx([-1.1, -1.202, 0.0, 0.0], abs=1e-6)
    assert adv[2].tolist() == pytest.approx([0.3, -0.2, 0.5, 0.0], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0.81, 0.81, 0.9, 1.0], abs=1e-6)
    assert ret[1].tolist() == pytest.approx([-1.0, -0.9, 0.0, 0.0], abs=1e-6)
    assert ret[2].tolist() == pytest.approx([0.3, 0.0, 0.6, 0.0], abs=1e-6)


@pytest.mark.parametrize("gamma,lam", [(0.9, 0.8), (1.0, 1.0), (0.5, 0.0), (0.0, 0.7)])
def test_gae_batch_equals_per_sample_loop(gamma, lam):
    g = torch.Generator().manual_seed(1)
    lengths = [1, 5, 17, 9, 30, 2]
    L = max(lengths)
    steps = torch.zeros(len(lengths), L, dtype=torch.long)
    r, V = torch.randn(len(lengths), L, generator=g), torch.randn(len(lengths), L, generator=g)
    mask = torch.zeros(len(lengths), L, dtype=torch.bool)
    for b, n in enumerate(lengths):
        steps[b, :n] = torch.randint(1, 12, (n,), generator=g)  # repeats and gaps
        mask[b, :n] = True
    ret, adv = step_gae(r, V, steps, mask, gamma=gamma, lam=lam)
    for b, n in enumerate(lengths):
        want_r, want_a = step_gae_per_sample(r[b, :n], V[b, :n], steps[b, :n], gamma, lam)
        assert torch.allclose(ret[b, :n], want_r, atol=1e-5)
        assert torch.allclose(adv[b, :n], want_a, atol=1e-5)
    assert not ret[~mask].any() and not adv[~mask].any()  # padding stays 0


def test_gae_gamma_lambda_one_is_return_minus_value():
    g = torch.Generator().manual_seed(0)
    steps = torch.tensor([[1, 2, 2, 3, 5, 5, 6, 4]])
    r = torch.randn(1, 8, generator=g)
    V = torch.randn(1, 8, generator=g)
    ret, adv = step_gae(r, V, steps, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, ret - V, atol=1e-6)
    # outcome mode: every token's return is the sequence reward
    ret, adv = step_gae(outcome_token_rewards(torch.tensor([0.7]), steps), V, steps)
    assert torch.allclose(ret, torch.full((1, 8), 0.7)) and torch.allclose(adv, 0.7 - V, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        step_gae(r, V[:, :3], steps)
