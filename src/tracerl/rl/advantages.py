"""Advantages over decode steps: GAE on the trajectory of a diffusion sampler.

TraceRL's value model (Wang et al. 2025, section 3.3; reference spec 6.4,
``compute_returns_and_advantages_from_fragments``) treats each global decode step of a
response as one time step of an MDP: the tokens unmasked together form one action, the
value of a token is the value model's output at its noisy position in the state just
before its step. Per-step quantities are means over the tokens of the step; token-level
returns and advantages add the token's own reward and value to the discounted tail.
"""

from __future__ import annotations

import torch


def step_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    steps: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token returns and advantages by GAE over the distinct decode steps of each response.

    A batch of ``B`` responses, right-padded to ``L`` tokens. For response ``b`` with
    distinct steps ``u_0 < ... < u_{S-1}`` among its valid tokens (global, across blocks),
    step means ``r*_i = mean r_j``, ``V*_i = mean V_j`` over tokens ``j`` of step ``u_i``,
    and ``V*_S = R*_S = A*_S = 0``:

    - ``R*_i = r*_i + gamma R*_{i+1}``
    - ``A*_i = r*_i - V*_i + gamma V*_{i+1} + gamma lam A*_{i+1}``
    - token ``j`` of step rank ``i``: ``R_j = r_j + gamma R*_{i+1}``,
      ``A_j = r_j - V_j + gamma V*_{i+1} + gamma lam A*_{i+1}``.

    With ``gamma = lam = 1``, ``A_j = R_j - V_j`` (tested). No whitening (as the reference).

    Batched: step ranks come from one sort per batch, step means from ``scatter_add``, and
    the backward recursion runs once over the step ranks for all responses together (a
    response with fewer steps sees zeros past its last step, which is exactly
    ``V*_S = R*_S = A*_S = 0``). Memory is ``O(B L)``.

    Args:
        rewards: ``[B, L]`` immediate token rewards (outcome mode: the sequence reward on
            the tokens of the last step, 0 elsewhere; see :func:`outcome_token_rewards`).
        values: ``[B, L]`` old values.
        steps: ``[B, L]`` decode step of each token (after shrink); any integers.
        mask: ``[B, L]`` bool, True at real tokens (None = all real).
        gamma, lam: discount and GAE ``lambda``.

    Returns:
        ``(returns [B, L], advantages [B, L])`` in float32, 0 at padding.
    """
    if not (rewards.shape == values.shape == steps.shape and rewards.dim() == 2):
        raise ValueError(
            f"rewards, values and steps must be equal [B, L] shapes, got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(steps.shape)}"
        )
    m = torch.ones_like(steps, dtype=torch.bool) if mask is None else mask.bool()
    if m.shape != steps.shape:
        raise ValueError(f"mask shape {tuple(m.shape)} != {tuple(steps.shape)}")
    B, L = steps.shape
    dev = steps.device  # computed where the inputs are
    r = rewards.double() * m
    v = values.double() * m
    if not m.any():
        return torch.zeros(B, L, device=dev), torch.zeros(B, L, device=dev)
    # rank of each token's step among the distinct steps of its response (padding last)
    key = torch.where(m, steps.long(), steps.long().max() + 1)
    sorted_key, order = key.sort(dim=1, stable=True)
    new = torch.ones_like(sorted_key, dtype=torch.long)
    new[:, 1:] = (sorted_key[:, 1:] != sorted_key[:, :-1]).long()
    rank = torch.empty_like(order).scatter_(1, order, new.cumsum(1) - 1)
    S = int(rank[m].max()) + 1
    rank = torch.where(m, rank, S)  # padding goes to a scratch column S
    # per-step means [B, S] (0 for steps a response does not have)
    f64 = dict(dtype=torch.float64, device=dev)
    z = torch.zeros(B, S + 1, **f64)
    cnt = z.scatter_add(1, rank, m.double())[:, :S]
    r_step = z.scatter_add(1, rank, r)[:, :S] / cnt.clamp(min=1)
    v_step = z.scatter_add(1, rank, v)[:, :S] / cnt.clamp(min=1)
    # backward recursion over step ranks, all responses at once; index i holds X*_{i+1}
    V_next = torch.cat([v_step[:, 1:], torch.zeros(B, 1, **f64)], dim=1)
    R_next = torch.zeros(B, S + 1, **f64)
    A_next = torch.zeros(B, S + 1, **f64)
    R_star = torch.zeros(B, **f64)
    A_star = torch.zeros(B, **f64)
    for i in range(S - 1, -1, -1):
        R_next[:, i], A_next[:, i] = R_star, A_star
        R_star = r_step[:, i] + gamma * R_star
        A_star = r_step[:, i] - v_step[:, i] + gamma * V_next[:, i] + gamma * lam * A_star
    idx = rank.clamp(max=S - 1)
    V_tok = torch.cat([V_next, torch.zeros(B, 1, **f64)], dim=1).gather(1, idx)
    returns = (r + gamma * R_next.gather(1, idx)) * m
    adv = (r - v + gamma * V_tok + gamma * lam * A_next.gather(1, idx)) * m
    return returns.float(), adv.float()


def outcome_token_rewards(reward: torch.Tensor | float, steps: torch.Tensor,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """Outcome rewards ``[B, L]``: each response's ``reward`` on the tokens of its last
    decode step, 0 elsewhere (spec 6.4 step 1); padding (``mask`` False) gets 0.

    Args:
        reward: ``[B]`` sequence rewards (or one float for every response).
        steps: ``[B, L]`` decode steps; mask: ``[B, L]`` bool (None = all real).

    Example:
        >>> outcome_token_rewards(torch.tensor([2.0]), torch.tensor([[1, 3, 2, 3]])).tolist()
        [[0.0, 2.0, 0.0, 2.0]]
    """
    m = torch.ones_like(steps, dtype=torch.bool) if mask is None else mask.bool()
    reward = torch.as_tensor(reward, dtype=torch.float32, device=steps.device).expand(steps.shape[0])
    if steps.numel() == 0:
        return torch.zeros(steps.shape, device=steps.device)
    s = torch.where(m, steps.long(), steps.long().min() - 1)
    last = m & (s == s.max(dim=1, keepdim=True).values)
    return torch.where(last, reward[:, None], 0.0)
