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
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token returns and advantages by GAE over the distinct decode steps of ONE response.

    With distinct steps ``u_0 < ... < u_{S-1}`` (global, across blocks), step means
    ``r*_i = mean r_j``, ``V*_i = mean V_j`` over tokens ``j`` of step ``u_i``, and
    ``V*_S = R*_S = A*_S = 0``:

    - ``R*_i = r*_i + gamma R*_{i+1}``
    - ``A*_i = r*_i - V*_i + gamma V*_{i+1} + gamma lam A*_{i+1}``
    - token ``j`` of step rank ``i``: ``R_j = r_j + gamma R*_{i+1}``,
      ``A_j = r_j - V_j + gamma V*_{i+1} + gamma lam A*_{i+1}``.

    With ``gamma = lam = 1``, ``A_j = R_j - V_j`` (tested). No whitening (as the reference).

    Args:
        rewards: ``[L]`` immediate token rewards (outcome mode: the sequence reward on the
            tokens of the last step, 0 elsewhere; see :func:`outcome_token_rewards`).
        values: ``[L]`` old values.
        steps: ``[L]`` decode step of each token (after shrink).

    Returns:
        ``(returns [L], advantages [L])`` in float32.
    """
    if not (rewards.shape == values.shape == steps.shape and rewards.dim() == 1):
        raise ValueError(
            f"rewards, values and steps must be equal 1-D shapes, got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(steps.shape)}"
        )
    r, v = rewards.double(), values.double()
    uniq, rank = torch.unique(steps, sorted=True, return_inverse=True)
    S = len(uniq)
    cnt = torch.bincount(rank, minlength=S).double()
    r_step = torch.zeros(S, dtype=torch.float64).index_add_(0, rank, r) / cnt
    v_step = torch.zeros(S, dtype=torch.float64).index_add_(0, rank, v) / cnt
    R_next = torch.zeros(S + 1, dtype=torch.float64)  # R*_{i+1} at index i
    A_next = torch.zeros(S + 1, dtype=torch.float64)
    V_next = torch.cat([v_step[1:], torch.zeros(1, dtype=torch.float64)])
    R_star = torch.zeros(S + 1, dtype=torch.float64)
    A_star = torch.zeros(S + 1, dtype=torch.float64)
    for i in range(S - 1, -1, -1):
        R_star[i] = r_step[i] + gamma * R_star[i + 1]
        A_star[i] = r_step[i] - v_step[i] + gamma * V_next[i] + gamma * lam * A_star[i + 1]
    R_next[:S] = R_star[1:]
    A_next[:S] = A_star[1:]
    returns = r + gamma * R_next[rank]
    adv = r - v + gamma * V_next[rank] + gamma * lam * A_next[rank]
    return returns.float(), adv.float()


def outcome_token_rewards(reward: float, steps: torch.Tensor) -> torch.Tensor:
    """Outcome reward ``[L]``: ``reward`` on the tokens of the last decode step, 0 elsewhere
    (spec 6.4 step 1).

    Example:
        >>> outcome_token_rewards(2.0, torch.tensor([1, 3, 2, 3])).tolist()
        [0.0, 2.0, 0.0, 2.0]
    """
    out = torch.zeros(steps.shape, dtype=torch.float32)
    if steps.numel():
        out[steps == steps.max()] = reward
    return out
