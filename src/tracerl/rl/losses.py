"""Losses of TraceRL, its value model and SFT: pure functions of tensors -> ``(loss, metrics)``.

Every loss takes per-token tensors of one shape ``[B, T]`` (rows x trained slots; a
flattened micro-batch is ``[1, M]``), a 0/1 ``mask`` and explicit normalisation, so that
the loss of an optimizer step is the sum of its micro-batches' losses and the gradient is
the same however the step is split into micro-batches or data-parallel ranks.

Normalisation (``normalize``):

- ``"tokens"`` (tracerl's default): divide by the number of trained tokens of the whole
  optimizer step (``num_tokens``). Every trained token weighs the same.
- ``"padded"`` (the reference, spec 4.7 and 6.5): ``(1/B) sum_n (1/L) sum_t``, dividing
  by the number of rows ``B`` of the step (reference rows, i.e. (sample, round) states)
  and the padded response length ``L`` (the reference's batch-global ``L1``), whatever
  the number of trained tokens. Long batches then take smaller steps; with ``old = new``
  the loss is ``-(1/B) sum_n A_n |m_n| / L`` (tested).
"""

from __future__ import annotations

from typing import Literal

import torch

Normalize = Literal["tokens", "padded"]


def _denominator(mask: torch.Tensor, normalize: Normalize, num_tokens: float | None,
                 num_rows: float | None, padded_len: float | None) -> float | torch.Tensor:
    if normalize == "tokens":
        return num_tokens if num_tokens is not None else mask.sum().clamp(min=1)
    if normalize == "padded":
        rows = num_rows if num_rows is not None else mask.shape[0]
        length = padded_len if padded_len is not None else mask.shape[-1]
        return rows * length
    raise ValueError(f"normalize must be 'tokens' or 'padded', got {normalize!r}")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
               estimator: Literal["k1", "k3"] = "k3", clamp: float = 10.0) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from samples of pi_old (Schulman 2020).

    ``d = logprobs - ref_logprobs``; ``k1 = d``; ``k3 = exp(-d) - 1 + d`` (>= 0), with
    ``-d`` clamped to ``+-clamp`` as in the reference (spec 4.7).

    Example: d = log 2 -> k3 = 1/2 - 1 + log 2 = 0.19315.
        >>> round(kl_penalty(torch.tensor([0.0]), torch.tensor([-0.6931472]))[0].item(), 5)
        0.19315
    """
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k3":
        return torch.exp(torch.clamp(-d, -clamp, clamp)) - 1 + d
    raise ValueError(f"kl estimator must be 'k1' or 'k3', got {estimator!r}")


def trace_rl_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps: float = 0.2,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_estimator: Literal["k1", "k3"] = "k3",
    normalize: Normalize = "tokens",
    num_tokens: float | None = None,
    num_rows: float | None = None,
    padded_len: float | None = None,
    log_ratio_clamp: float = 10.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped TraceRL objective with an optional KL penalty (paper eq. 4; spec 4.7).

    ``rho = exp(clamp(l - l_old, +-10))``; ``S = min(rho A, clip(rho, 1-eps, 1+eps) A)``;
    ``loss = -sum(m S) / D + beta sum(m kl) / D`` with ``D`` from ``normalize``.

    Args:
        logprobs: ``[B, T]`` log-probs of the trained tokens under the current policy.
        old_logprobs: ``[B, T]`` under the policy that sampled (or the pre-update policy).
        advantages: ``[B, T]`` per-token advantages (a sequence advantage broadcast).
        mask: ``[B, T]`` 1 where a token is trained.
        eps: clip range. beta: KL coefficient. ref_logprobs: ``[B, T]`` KL target (default
            ``old_logprobs``: the reference pulls towards the pre-update policy).
        normalize, num_tokens, num_rows, padded_len: see the module docstring; the
            defaults normalise over this call's tensors.

    Returns:
        ``(loss, metrics)``; metrics: policy_loss, kl, clip_fraction, ratio_mean, ratio_max,
        tokens (plain floats over the masked tokens).
    """
    m = mask.to(logprobs.dtype)
    log_ratio = torch.clamp(logprobs - old_logprobs, -log_ratio_clamp, log_ratio_clamp) * m
    ratio = torch.exp(log_ratio)
    surr1 = ratio * advantages
    surr2 = torch.clamp(ratio, 1 - eps, 1 + eps) * advantages
    surr = torch.minimum(surr1, surr2)
    denom = _denominator(m, normalize, num_tokens, num_rows, padded_len)
    policy = -(surr * m).sum() / denom
    target = old_logprobs if ref_logprobs is None else ref_logprobs
    kl_tok = kl_penalty(logprobs, target, kl_estimator) * m
    kl = kl_tok.sum() / denom
    loss = policy + beta * kl if beta > 0 else policy
    with torch.no_grad():
        n = m.sum().clamp(min=1)
        sel = m > 0
        metrics = {
            "policy_loss": policy.item(),
            "kl": (kl_tok.sum() / n).item(),
            "clip_fraction": (((surr2 < surr1) & sel).sum() / n).item(),
            "ratio_mean": ((ratio * m).sum() / n).item(),
            "ratio_max": ratio[sel].max().item() if sel.any() else 1.0,
            "tokens": m.sum().item(),
        }
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float = 0.2,
    normalize: Normalize = "tokens",
    num_tokens: float | None = None,
    num_rows: float | None = None,
    padded_len: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss (spec 6.5): ``0.5 max((v - R)^2, (v_clip - R)^2)``.

    ``v_clip = v_old + clamp(v - v_old, -clip, clip)``.

    Args:
        values, old_values, returns, mask: ``[B, T]``.

    Returns:
        ``(loss, metrics)``; metrics: value_loss, value_clip_fraction, value_mean, tokens.
    """
    m = mask.to(values.dtype)
    v_clip = old_values + torch.clamp(values - old_values, -clip, clip)
    l1 = (values - returns) ** 2
    l2 = (v_clip - returns) ** 2
    per = 0.5 * torch.maximum(l1, l2)
    loss = (per * m).sum() / _denominator(m, normalize, num_tokens, num_rows, padded_len)
    with torch.no_grad():
        n = m.sum().clamp(min=1)
        metrics = {"value_loss": loss.item(), "value_clip_fraction": (((l2 > l1) * m).sum() / n).item(),
                   "value_mean": ((values * m).sum() / n).item(), "tokens": m.sum().item()}
    return loss, metrics


def sft_loss(
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    normalize: Normalize = "tokens",
    num_tokens: float | None = None,
    num_rows: float | None = None,
    padded_len: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Masked-token cross-entropy ``-sum(m log p) / D`` (spec 7; no 1/t weighting, as the
    reference)."""
    m = mask.to(logprobs.dtype)
    loss = -(logprobs * m).sum() / _denominator(m, normalize, num_tokens, num_rows, padded_len)
    with torch.no_grad():
        n = m.sum().clamp(min=1)
        metrics = {"sft_loss": loss.item(), "nll": (-(logprobs * m).sum() / n).item(),
                   "tokens": m.sum().item()}
    return loss, metrics


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """``1 - Var(R - V) / Var(R)`` over flat tensors (nan when ``Var(R) = 0``)."""
    var = returns.float().var(unbiased=False)
    if values.numel() < 2 or var.item() == 0:
        return float("nan")
    return (1 - (returns - values).float().var(unbiased=False) / var).item()
