"""Attention masks of block diffusion, as small pure functions.

One convention, shared by the sampler and the trainer (DESIGN.md, "block alignment"):

**Blocks are aligned to absolute positions.** Position ``p`` (0 = the first real prompt
token) belongs to block ``p // b``. A prompt whose length ``P`` is not a multiple of ``b``
therefore shares its last, partial block with the first response tokens: the prompt tail
is part of the first block that is denoised. This is how SDAR/TraDo were trained and how
their engine decodes (reference spec section 2.3). The reference *trainer* instead aligns
blocks to the response start, which differs from its own sampler whenever
``P mod b != 0`` (spec section 4.5, bug 12.2.3); tracerl uses the absolute convention in
both places, so rollout and training log-probs agree for every prompt length.

Every token of a forward pass carries three attributes:

- ``block``: its block id (``position // b``; pads get -1),
- ``noisy``: whether it belongs to the noisy stream (a partially masked copy of a block)
  or to the clean stream (committed context),
- ``valid``: False for padding.

Key ``k`` is visible to query ``q`` iff ``k`` is valid and either

- ``k`` is clean and ``block(k) < block(q)`` (clean earlier blocks), or
- ``k`` is clean, ``q`` is clean and ``block(k) == block(q)`` (a clean block sees itself), or
- ``k`` and ``q`` are both noisy and ``block(k) == block(q)`` (a noisy block sees itself,
  bidirectionally, and nothing of other noisy blocks).

The same rule yields the prefill mask (all clean: block-causal), the cached denoising
mask (noisy current block over the clean cache), the commit mask, and the training mask
of the ``[clean sequence | noisy blocks]`` layout (BD3-LM's x_t ⊕ x_0 construction,
Arriola et al. 2025; TraceRL spec section 4.5). Full-attention families (LLaDA, Dream)
use :func:`full_visibility`.
"""

from __future__ import annotations

import torch


def block_ids(positions: torch.Tensor, block_size: int, valid: torch.Tensor | None = None):
    """Block id of every position (``position // block_size``); -1 where not valid.

    Args:
        positions: ``[B, T]`` absolute positions (0 = first real prompt token).
        block_size: ``b``.
        valid: optional ``[B, T]`` bool, False for padding.

    Example:
        >>> block_ids(torch.tensor([[0, 1, 2, 3, 4]]), 2).tolist()
        [[0, 0, 1, 1, 2]]
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    b = torch.div(positions, block_size, rounding_mode="floor")
    if valid is not None:
        b = torch.where(valid, b, torch.full_like(b, -1))
    return b


def block_visibility(
    q_block: torch.Tensor,
    q_noisy: torch.Tensor,
    k_block: torch.Tensor,
    k_noisy: torch.Tensor,
    k_valid: torch.Tensor,
) -> torch.Tensor:
    """Boolean visibility ``[B, Q, K]`` (True = query may attend to key) of block diffusion.

    Args:
        q_block: ``[B, Q]`` block id of each query.
        q_noisy: ``[B, Q]`` bool, query belongs to the noisy stream.
        k_block: ``[B, K]`` block id of each key.
        k_noisy: ``[B, K]`` bool, key belongs to the noisy stream.
        k_valid: ``[B, K]`` bool, False for padding keys.
    """
    qb = q_block[:, :, None]
    kb = k_block[:, None, :]
    qn = q_noisy[:, :, None]
    kn = k_noisy[:, None, :]
    clean_key = ~kn & ((kb < qb) | ((kb == qb) & ~qn))
    noisy_key = kn & qn & (kb == qb)
    return k_valid[:, None, :] & (clean_key | noisy_key)


def full_visibility(k_valid: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Bidirectional visibility ``[B, Q, K]``: every query sees every valid key."""
    return k_valid[:, None, :].expand(-1, num_queries, -1)


def ensure_nonempty(visible: torch.Tensor) -> torch.Tensor:
    """Let query rows that see no key see every key.

    Such rows are padding queries; their outputs are ignored, but an all-masked row
    makes softmax produce NaN, and a NaN value vector then poisons real rows through
    ``0 * NaN`` in later layers. Opening the row keeps every output finite.
    """
    empty = ~visible.any(dim=-1, keepdim=True)
    return visible | empty


def attention_bias(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive float mask ``[B, 1, Q, K]`` for SDPA: 0 where visible, dtype-min elsewhere.

    The most negative finite value (not -inf) keeps fully masked rows finite.

    Example:
        >>> attention_bias(torch.tensor([[[True, False]]]), torch.float32)[0, 0, 0, 0].item()
        0.0
    """
    visible = ensure_nonempty(visible)
    bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    bias.masked_fill_(~visible, torch.finfo(dtype).min)
    return bias[:, None, :, :]


def training_layout(
    prompt_len: int, response_len: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions, block ids and the noisy flag of the TraceRL training layout of ONE sequence.

    Layout: ``[prompt (P) | clean response (L) | noisy segment]``, where the noisy segment
    is a copy of the blocks that hold response tokens, from the start of the block that
    contains position ``P`` to the end: ``P mod b`` prompt-tail tokens (never masked)
    followed by the ``L`` response tokens (masked per training row). Copies reuse the
    positions of the tokens they copy.

    Returns:
        positions ``[N]``, blocks ``[N]``, noisy ``[N]`` (bool), with
        ``N = P + L + (P mod b) + L``.

    Example (P=3, L=3, b=2): clean positions 0..5, noisy copy of blocks 1 and 2 = positions 2..5.
        >>> pos, blk, noisy = training_layout(3, 3, 2)
        >>> pos.tolist()
        [0, 1, 2, 3, 4, 5, 2, 3, 4, 5]
        >>> blk.tolist()
        [0, 0, 1, 1, 2, 2, 1, 1, 2, 2]
    """
    if prompt_len < 1:
        raise ValueError("prompt_len must be >= 1")
    tail = prompt_len % block_size
    clean = torch.arange(prompt_len + response_len)
    noisy_pos = torch.arange(prompt_len - tail, prompt_len + response_len)
    positions = torch.cat([clean, noisy_pos])
    noisy = torch.cat(
        [torch.zeros(len(clean), dtype=torch.bool), torch.ones(len(noisy_pos), dtype=torch.bool)]
    )
    return positions, torch.div(positions, block_size, rounding_mode="floor"), noisy
