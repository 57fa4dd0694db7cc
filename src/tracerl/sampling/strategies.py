"""Token sampling and remasking strategies of block diffusion, as small pure functions.

One denoising step of a block (reference spec sections 2.4 and 2.5; the low-confidence
remasking of LLaDA, Nie et al. 2025, and its dynamic/entropy-bounded variants used by
TraDo, Wang et al. 2025, arXiv 2509.06949):

1. :func:`process_logits`: the raw logits become the *processed* distribution
   (mask token removed, temperature, top-k, top-p).
2. A candidate ``x0`` is drawn for every position of the block from it.
3. Its *confidence* is the probability of the drawn token under the processed
   distribution (not the maximum probability: reference 2.4).
4. A strategy from :data:`STRATEGIES` picks which still-masked positions take their
   candidate at this step (``transfer``); the rest stay masked.

Every strategy here transfers at least one and at most all of the still-masked positions
of a row, and never touches a position that is not masked: the reference engine's
``topk`` over ``-inf`` confidences could overwrite prompt-tail or already decoded tokens
(reference 2.5, bug 12.2.5), which cannot happen here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tracerl.registry import Registry

NEG_INF = float("-inf")


def transfer_schedule(block_size: int, steps: int) -> list[int]:
    """Tokens to unmask at each of the ``steps`` denoising steps of a block (the b/T schedule).

    ``n[s] = floor(b/T) + (1 if s < b mod T else 0)`` (reference 2.5,
    ``get_num_transfer_tokens``).

    Example:
        >>> transfer_schedule(4, 4), transfer_schedule(5, 3), transfer_schedule(4, 3)
        ([1, 1, 1, 1], [2, 2, 1], [2, 1, 1])
    """
    base, extra = divmod(block_size, steps)
    return [base + (1 if s < extra else 0) for s in range(steps)]


def process_logits(logits: torch.Tensor, mask_id: int, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The processed sampling distribution ``[..., V]`` of raw ``logits`` ``[..., V]``.

    Order as in the reference pipe (2.4): mask token to ``-inf`` (it is never emitted),
    divide by ``temperature`` (``0`` = greedy: the distribution is then taken at
    temperature 1, so confidences stay informative), keep the ``top_k`` largest (0 = off),
    keep the smallest prefix of the sorted distribution whose mass reaches ``top_p``
    (the most likely token always survives), softmax. Computed in float32.

    Example:
        >>> p = process_logits(torch.tensor([2.0, 1.0, 0.0, 5.0]), mask_id=3, top_k=2)
        >>> [round(v, 4) for v in p.tolist()]
        [0.7311, 0.2689, 0.0, 0.0]
    """
    z = logits.float().clone()  # never modify the caller's logits in place
    z[..., mask_id] = NEG_INF
    if temperature > 0 and temperature != 1.0:
        z = z / temperature
    vocab = z.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, NEG_INF)
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        p_sorted = torch.softmax(sorted_z, dim=-1)
        before = torch.cumsum(p_sorted, dim=-1) - p_sorted  # mass of strictly likelier tokens
        drop = before >= top_p
        drop[..., 0] = False
        z = z.scatter(-1, order, sorted_z.masked_fill(drop, NEG_INF))
    return torch.softmax(z, dim=-1)


def draw_tokens(probs: torch.Tensor, generators: list[torch.Generator],
                greedy: bool) -> torch.Tensor:
    """One token per position ``[R, b]`` from ``probs`` ``[R, b, V]``.

    Row ``r`` draws its ``b`` uniforms from ``generators[r]`` only, so a sequence's draws
    never depend on its batch neighbours; the tokens follow by inverse-CDF lookup, all
    rows at once (the same distribution as ``torch.multinomial``, without one call per
    row). Tokens of zero probability are never drawn. ``greedy``: the argmax.

    Example:
        >>> p = torch.tensor([[[0.0, 0.7, 0.0, 0.3]]])
        >>> draw_tokens(p, [torch.Generator().manual_seed(0)], greedy=True).tolist()
        [[1]]
    """
    if greedy:
        return probs.argmax(dim=-1)
    u = torch.stack([torch.rand(probs.shape[1], generator=g, device=probs.device)
                     for g in generators])  # [R, b]
    cdf = probs.cumsum(dim=-1)  # [R, b, V], non-decreasing
    x = torch.searchsorted(cdf, (u * cdf[..., -1])[..., None], right=True).squeeze(-1)
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)  # last token with mass
    return torch.minimum(x, last)  # float rounding at the top end cannot pick a zero-mass id


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """``H = -sum p log p`` over the last dim, probabilities clamped at 1e-12 (reference 2.5)."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


def top_ranked(score: torch.Tensor, masked: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool ``[R, b]``: the ``k[r]`` highest-``score`` masked positions of each row.

    Non-masked positions are never chosen; ties go to the earlier position (stable sort).

    Example:
        >>> top_ranked(torch.tensor([[0.1, 0.9, 0.5, 0.7]]), torch.tensor([[True, False, True, True]]),
        ...            torch.tensor([2])).tolist()
        [[False, False, True, True]]
    """
    score = score.masked_fill(~masked, NEG_INF)
    order = torch.argsort(score, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(score.shape[-1], device=score.device).expand_as(order))
    return masked & (rank < k[:, None])


def _scheduled(masked: torch.Tensor, n: int) -> torch.Tensor:
    """The scheduled count, at least 1, at most the masked count of the row: ``[R]``."""
    return masked.sum(-1).clamp(max=max(n, 1))


# A strategy maps (confidence [R,b], probs [R,b,V], masked [R,b], scheduled count n,
# dynamic threshold, entropy bound) to the bool transfer set [R, b].
Strategy = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, float, float], torch.Tensor]


def low_confidence_static(conf, probs, masked, n, threshold, bound):
    """The ``n`` most confident masked positions (fewer only when fewer are masked)."""
    return top_ranked(conf, masked, _scheduled(masked, n))


def low_confidence_dynamic(conf, probs, masked, n, threshold, bound):
    """Every masked position with confidence ``> threshold``; if fewer than ``n``, the ``n``
    most confident (which contain them). Always at least one per step."""
    return masked & ((conf > threshold) | top_ranked(conf, masked, _scheduled(masked, n)))


def entropy_bounded(conf, probs, masked, n, threshold, bound):
    """The lowest-entropy masked positions whose cumulative entropy stays below ``bound``
    (at least one): ``k = #{i : cumsum(sort(H))_i < bound}`` (reference 2.5)."""
    h = entropy(probs).masked_fill(~masked, float("inf"))
    cum = torch.cumsum(torch.sort(h, dim=-1).values, dim=-1)
    k = (cum < bound).sum(-1).clamp(min=1)
    return top_ranked(-h, masked, k)


def sequential(conf, probs, masked, n, threshold, bound):
    """The first ``n`` masked positions, left to right."""
    b = masked.shape[-1]
    leftmost = -torch.arange(b, dtype=torch.float32, device=masked.device).expand(masked.shape)
    return top_ranked(leftmost, masked, _scheduled(masked, n))


STRATEGIES: Registry[Strategy] = Registry("remasking strategy")
"""Remasking strategies by name (``rollout.strategy``, ``evaluate.strategies``)."""

STRATEGIES.add("low_confidence_static", low_confidence_static)
STRATEGIES.add("low_confidence_dynamic", low_confidence_dynamic)
STRATEGIES.add("entropy_bounded", entropy_bounded)
STRATEGIES.add("sequential", sequential)
