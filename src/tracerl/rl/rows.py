"""Trajectories -> training rows: which tokens a forward pass trains, and in which context.

TraceRL (Wang et al. 2025, arXiv 2509.06949, section 3.2; reference spec sections 4.3-4.5)
trains each response token in the exact block state the sampler unmasked it from: the
positions of its block decoded at earlier steps are visible, the rest of the block is
masked, and earlier blocks are clean context. This module turns one trajectory (prompt
ids, response ids to the end of the last block, the 1-based decode step of each position)
into rows for :class:`tracerl.models.DiffusionLM`.

Vocabulary of this module (one glossary, used everywhere in :mod:`tracerl.rl`):

- ``decode_steps`` ``[R]``: the global step at which each response position was unmasked.
- ``block`` of a response position ``j``: ``(P + j) // b``, absolute alignment
  (:mod:`tracerl.models.masks`); the prompt tail shares the first response block.
- ``rank`` ``[R]``: index of a position's (shrunk) step among the distinct steps of its
  block. Round ``k`` trains the positions of rank ``k`` and masks those of rank ``>= k``:
  the reference's ``one_round_vectorized`` loop (spec 4.4), in closed form.
- a **copy**: one partially masked copy of the response blocks (plus the prompt tail,
  never masked) appended after the clean sequence. Copies see clean earlier blocks and
  their own block only; they never see each other.

Packing (beyond the reference, same result): the reference builds one row
``[prompt | clean response | noisy copy]`` per round; here one row holds the clean
sequence once and up to ``copies_per_row`` noisy copies (default: every round of the
sequence), so the prompt and the clean response are encoded once instead of once per
round. Because a copy sees only clean context and itself, a token's log-prob is the same
in either layout (tested). ``copies_per_row=1`` gives the reference layout.

Full-attention families (LLaDA, Dream; spec section 5) have no clean stream: one row per
(shrunk) step, ``[prompt | response with every position of rank >= k masked]``, ranks taken
over the whole response.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch

from tracerl.devices import HOST, on_host

_BIG = 1 << 40  # key = block * _BIG + step (steps are far below 2**40)


class TrajectoryError(ValueError):
    """A trajectory cannot be turned into rows without misaligning tokens."""


@dataclass(frozen=True)
class TraceSample:
    """One response of a rollout, as the trainer needs it (the ROLLOUT/SCORED record).

    ``response_ids``, ``decode_steps`` and ``logprobs`` cover every decoded position to the
    end of the last block; only the first ``response_len`` (through EOS) are trained.
    ``token_advantages`` (value model, GAE) and ``token_rewards`` (process reward) have
    ``response_len`` entries.

    ``attention`` (``"block"`` or ``"full"``) and ``block_size`` say how the trajectory was
    decoded (the ROLLOUT record's columns of the same names). They are the trainer's
    contract: rows are rebuilt with them (:func:`records_block_size`), never with a block
    size from params or from the model's config. None = not recorded, which the RL updates
    refuse. ``train_block_size`` (ROLLOUT column of that name; None = ``block_size``) is
    the block the update trains at, a multiple of ``block_size`` (block-size adaptation).
    """

    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    decode_steps: Sequence[int] | None
    response_len: int
    advantage: float = 0.0
    logprobs: Sequence[float] | None = None
    token_advantages: Sequence[float] | None = None
    token_rewards: Sequence[float] | None = None
    policy_id: str | None = None
    sample_id: str = ""
    attention: str | None = None
    block_size: int | None = None
    train_block_size: int | None = None
    exact_logprobs: bool = True  # False: sampled with an approximate cache (full_cache)

    @property
    def train_block(self) -> int | None:
        """The block size the update trains this trajectory at."""
        return self.train_block_size or self.block_size


def check_sample(s: TraceSample, index: int = 0) -> None:
    """Raise :class:`TrajectoryError` if ``s`` is inconsistent (never silently misalign)."""
    name = s.sample_id or f"#{index}"
    R = len(s.response_ids)
    problems = []
    if len(s.prompt_ids) < 1:
        problems.append("empty prompt")
    if not 0 < s.response_len <= R:
        problems.append(f"response_len {s.response_len} not in [1, len(response_ids)={R}]")
    if s.decode_steps is not None:
        if len(s.decode_steps) != R:
            problems.append(
                f"decode_steps has {len(s.decode_steps)} entries but response_ids has {R}: "
                "the step map must cover exactly the decoded positions"
            )
        elif R and min(s.decode_steps) < 1:
            problems.append("decode_steps must be 1-based (>= 1)")
    if s.logprobs is not None and len(s.logprobs) != R:
        problems.append(f"logprobs has {len(s.logprobs)} entries, response_ids {R}")
    for nm in ("token_advantages", "token_rewards"):
        v = getattr(s, nm)
        if v is not None and len(v) != s.response_len:
            problems.append(f"{nm} has {len(v)} entries, response_len is {s.response_len}")
        elif v is not None and not all(math.isfinite(x) for x in v):
            problems.append(f"{nm} has non-finite entries")
    if not math.isfinite(s.advantage):
        problems.append(f"advantage {s.advantage} is not finite")
    if problems:
        raise TrajectoryError(f"trajectory {name}: " + "; ".join(problems))


def records_block_size(samples: Sequence[TraceSample], attention: str,
                       model: str = "the model") -> int | None:
    """The block size rows of ``samples`` are built with: the one they were decoded with,
    or the training block the record names (``train_block_size``, a multiple of it).

    The trajectory record is the trainer's contract (a curriculum block-size schedule
    samples at block 8 from a model built at block 4, and the update must then train at
    block 8). Every sample must record how it was decoded, with the attention of the
    model being trained, and all samples of one update must share one training block.
    A training block of ``m * b`` over trajectories decoded at ``b`` holds ``m`` decoding
    blocks; since decode steps are global, the rounds (step ranks within a training
    block) follow the decode order across them (the reference's ``training.block_size =
    2b``, ``tracerl_reference.md`` 8).

    Args:
        samples: the update's trajectories.
        attention: the trained model's attention (``"block"`` or ``"full"``).
        model: the model's name, for messages.

    Returns:
        the records' block size for block attention; None for full attention (rows take
        ranks over the whole response, spec section 5, whatever the semi-AR block size).

    Raises:
        TrajectoryError: a sample without ``attention``/``block_size``, samples of different
            attention or block sizes, or attention that differs from the model's; the
            message says what was found and what to do.
    """
    if not samples:
        return None
    missing = [s.sample_id or f"#{i}" for i, s in enumerate(samples)
               if s.attention is None or (s.attention == "block" and not s.block_size)]
    if missing:
        raise TrajectoryError(
            f"{len(missing)} trajectories (e.g. {', '.join(missing[:3])}) do not record how they "
            "were decoded (attention and block_size): the trainer builds rows from the record, "
            "never from params. Records written by tracerl.sampling carry them (ROLLOUT columns "
            "attention, block_size); when building TraceSample by hand pass "
            "attention='block'|'full' and block_size=b")
    kinds = sorted({s.attention for s in samples})
    if len(kinds) > 1:
        raise TrajectoryError(
            f"one update mixes trajectories decoded with {' and '.join(kinds)} attention; "
            "train each kind with a model of that attention")
    if kinds[0] != attention:
        raise TrajectoryError(
            f"the trajectories were decoded with {kinds[0]} attention but {model} uses "
            f"{attention} attention, so their decoding contexts cannot be rebuilt: train a "
            f"{kinds[0]}-attention model on them, or re-run the rollout with this model")
    if attention == "full":
        return None
    bad = [f"{s.sample_id or f'#{i}'} (train {s.train_block_size}, decoded {s.block_size})"
           for i, s in enumerate(samples)
           if s.train_block_size and s.train_block_size % int(s.block_size)]
    if bad:
        raise TrajectoryError(
            f"{len(bad)} trajectories name a training block that is not a multiple of the "
            f"block they were decoded with (e.g. {', '.join(bad[:2])}): a training block must "
            "hold whole decoding blocks; fix curriculum.train_block_size_schedule")
    sizes: dict[int, list[str]] = {}
    for i, s in enumerate(samples):
        sizes.setdefault(int(s.train_block), []).append(s.sample_id or f"#{i}")
    if len(sizes) > 1:
        found = "; ".join(f"block_size {b}: {len(ids)} samples (e.g. {', '.join(ids[:2])})"
                          for b, ids in sorted(sizes.items()))
        raise TrajectoryError(
            f"one update mixes trajectories of different block sizes ({found}; training blocks); "
            "rows of one update are built at one block size: update on each block size's "
            "records separately, or re-run the rollout at a single block size")
    return next(iter(sizes))


# --------------------------------------------------------------------------- steps


@on_host
def response_blocks(prompt_len: int, response_len: int, block_size: int | None) -> torch.Tensor:
    """Block id ``[R]`` of each response position (absolute alignment); all 0 if full attention.

    Example (P=3, b=2): positions 3,4,5,6 -> blocks 1,2,2,3.
        >>> response_blocks(3, 4, 2).tolist()
        [1, 2, 2, 3]
    """
    if block_size is None:
        return torch.zeros(response_len, dtype=torch.long)
    return torch.div(torch.arange(prompt_len, prompt_len + response_len), block_size,
                     rounding_mode="floor")


@on_host
def shrink_steps(steps: torch.Tensor, blocks: torch.Tensor, shrink: int) -> torch.Tensor:
    """Merge ``shrink`` consecutive distinct steps of each block into one (spec 4.3).

    Within a block with sorted distinct steps ``u_0 < ... < u_{n-1}``, step ``u_q`` becomes
    ``u_{min((q // s + 1) s - 1, n - 1)}``, the group's largest value (reference
    ``collapse_k_unique``); ``s = 1`` is the identity.

    Args:
        steps: ``[R]`` decode steps (>= 1).
        blocks: ``[R]`` block id per position.
        shrink: ``s >= 1``.

    Returns:
        ``[R]`` shrunk steps.

    Example (one block, steps 1..5, s=2): groups {1,2}->2, {3,4}->4, {5}->5.
        >>> shrink_steps(torch.tensor([3, 1, 2, 5, 4]), torch.zeros(5, dtype=torch.long), 2).tolist()
        [4, 2, 2, 5, 4]
    """
    if shrink < 1:
        raise ValueError(f"shrink must be >= 1, got {shrink}")
    if shrink == 1 or steps.numel() == 0:
        return steps.clone()
    uk, first, inv = _distinct(steps, blocks)
    rank_u = torch.arange(len(uk)) - first  # rank of each distinct key within its block
    count_u = torch.bincount(first, minlength=len(uk))[first]  # distinct steps in that block
    target = torch.minimum((rank_u // shrink + 1) * shrink - 1, count_u - 1)
    return (uk[first + target] % _BIG)[inv]


def _distinct(steps: torch.Tensor, blocks: torch.Tensor):
    """Sorted distinct (block, step) keys, the index of each key's block start, and inverse."""
    key = blocks.long() * _BIG + steps.long()
    uk, inv = torch.unique(key, sorted=True, return_inverse=True)
    ub = torch.div(uk, _BIG, rounding_mode="floor")
    first = torch.searchsorted(ub, ub)  # first index of each block in the sorted keys
    return uk, first, inv


def step_ranks(steps: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Rank ``[R]`` of each position's step among the distinct steps of its block.

    Round ``k`` of TraceRL trains the positions of rank ``k`` and masks rank ``>= k``.

    Example (b=2, two blocks): steps [2, 1 | 3, 3] -> ranks [1, 0 | 0, 0].
        >>> step_ranks(torch.tensor([2, 1, 3, 3]), torch.tensor([0, 0, 1, 1])).tolist()
        [1, 0, 0, 0]
    """
    if steps.numel() == 0:
        return steps.clone().long()
    uk, first, inv = _distinct(steps, blocks)
    return (torch.arange(len(uk)) - first)[inv]


def rounds_loop(steps: torch.Tensor, blocks: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The reference's round loop (spec 4.4, ``one_round_vectorized``), kept as the test oracle.

    Returns:
        one ``(masked [R] bool, trained [R] bool)`` per round.
    """
    sigma = steps.clone().long()
    out = []
    while True:
        masked = torch.zeros_like(sigma, dtype=torch.bool)
        trained = torch.zeros_like(masked)
        for beta in blocks.unique().tolist():
            in_b = blocks == beta
            live = in_b & (sigma >= 0)
            if not live.any():
                continue
            mu = sigma[live].min()
            trained |= in_b & (sigma == mu)
            masked |= in_b & (sigma >= mu)
        if not trained.any():
            return out
        out.append((masked, trained))
        sigma[trained] = -1


def rounds_from_ranks(ranks: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Vectorised rounds: ``(rank >= k, rank == k)`` for ``k = 0..max rank``."""
    if ranks.numel() == 0:
        return []
    return [(ranks >= k, ranks == k) for k in range(int(ranks.max()) + 1)]


# --------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One forward row: input tokens and the tokens it trains.

    Attributes:
        input_ids, position_ids, segment: ``[N]``; ``segment`` is 0 for the clean stream
            (prompt + clean response) and ``c + 1`` for noisy copy ``c``. Full-attention rows
            put everything in segment 1 (``attention == "full"``).
        target_index: ``[M]`` indices into the row whose logits are needed.
        labels: ``[M]`` the token at each target.
        sample: index of the source sample; ``resp_pos`` ``[M]``: response position ``j``.
        round: ``[M]`` the round (shrunk step rank) that trains each target.
        tokens: per-target float tensors ``[M]`` attached later (advantages, old_logprobs, ...).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment: torch.Tensor
    target_index: torch.Tensor
    labels: torch.Tensor
    sample: int
    resp_pos: torch.Tensor
    round: torch.Tensor
    attention: str = "block"
    block_size: int | None = None
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_targets(self) -> int:
        return int(self.target_index.numel())

    def __len__(self) -> int:
        return int(self.input_ids.numel())


def block_row(prompt: torch.Tensor, response: torch.Tensor,
              copies: Sequence[tuple[torch.Tensor, torch.Tensor]], block_size: int,
              mask_id: int, *, sample: int = 0, rounds: Sequence[int] | None = None) -> Row:
    """``[prompt | clean response | copy_0 | copy_1 | ...]`` for a block-diffusion model.

    Each copy covers the blocks from the one holding position ``P`` to the end: the
    ``P mod b`` prompt-tail tokens (never masked) then the response with ``masked``
    positions replaced by ``mask_id``; it trains the ``trained`` positions.

    Args:
        prompt: ``[P]`` ids; response: ``[R]`` ids (to the end of the last block).
        copies: ``(masked [R] bool, trained [R] bool)`` per copy; ``trained`` must be masked.
        rounds: the round id of each copy (default ``0..C-1``).

    Returns:
        a :class:`Row` of length ``N = P + R + C (P mod b + R)``.
    """
    P, R = len(prompt), len(response)
    tail = P % block_size
    start = P - tail
    ids = [prompt, response]
    pos = [torch.arange(P + R)]
    seg = [torch.zeros(P + R, dtype=torch.long)]
    tgt, lab, rpos, rnd = [], [], [], []
    copy_pos = torch.arange(start, P + R)
    offset = P + R
    rounds = list(range(len(copies))) if rounds is None else list(rounds)
    for c, (masked, trained) in enumerate(copies):
        if (trained & ~masked).any():
            raise AssertionError("a trained position must be masked in its copy")
        noisy = torch.where(masked, torch.full_like(response, mask_id), response)
        ids.append(prompt[start:])
        ids.append(noisy)
        pos.append(copy_pos)
        seg.append(torch.full((tail + R,), c + 1, dtype=torch.long))
        j = torch.nonzero(trained).flatten()
        tgt.append(offset + tail + j)
        lab.append(response[j])
        rpos.append(j)
        rnd.append(torch.full_like(j, rounds[c]))
        offset += tail + R
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long)  # noqa: E731
    return Row(torch.cat(ids).long(), torch.cat(pos), torch.cat(seg), cat(tgt), cat(lab),
               sample, cat(rpos), cat(rnd), "block", block_size)


def full_row(prompt: torch.Tensor, response: torch.Tensor, masked: torch.Tensor,
             trained: torch.Tensor, mask_id: int, *, sample: int = 0, round: int = 0) -> Row:
    """``[prompt | response with masked positions -> mask_id]`` for a full-attention model."""
    P = len(prompt)
    noisy = torch.where(masked, torch.full_like(response, mask_id), response)
    j = torch.nonzero(trained).flatten()
    n = P + len(response)
    return Row(torch.cat([prompt, noisy]).long(), torch.arange(n), torch.ones(n, dtype=torch.long),
               P + j, response[j], sample, j, torch.full_like(j, round), "full", None)


@dataclass
class RowStats:
    """Counts of what row building kept and skipped (logged as metrics)."""

    samples: int = 0
    skipped_too_long: int = 0
    rows: int = 0
    copies: int = 0  # (sample, round) states, i.e. reference rows
    targets: int = 0
    block_size: int = 0  # the block size the rows were built with (0 = full attention)

    def as_metrics(self, prefix: str = "rows/") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in self.__dict__.items()}


def _tensors(s: TraceSample) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.as_tensor(list(s.prompt_ids), dtype=torch.long),
            torch.as_tensor(list(s.response_ids), dtype=torch.long))


def _admitted(samples: Sequence[TraceSample], max_len: int, stats: RowStats):
    """Check every sample; yield ``(i, sample, prompt, response)`` for those within
    ``max_len`` (``P + R``; 0 = no limit), counting kept and skipped in ``stats``."""
    for i, s in enumerate(samples):
        check_sample(s, i)
        prompt, response = _tensors(s)
        if max_len and len(prompt) + len(response) > max_len:
            stats.skipped_too_long += 1
            continue
        stats.samples += 1
        yield i, s, prompt, response


def _finished(rows: list[Row], stats: RowStats) -> tuple[list[Row], RowStats]:
    stats.rows = len(rows)
    stats.targets = sum(r.num_targets for r in rows)
    return rows, stats


def _chunks(items: list, size: int) -> list[list]:
    size = size if size > 0 else max(len(items), 1)
    return [items[i:i + size] for i in range(0, len(items), size)]


@on_host
def build_trace_rows(samples: Sequence[TraceSample], *, block_size: int | None, mask_id: int,
                     shrink: int = 1, copies_per_row: int = 0, max_len: int = 0
                     ) -> tuple[list[Row], RowStats]:
    """TraceRL rows (spec 4.4 block models, section 5 full attention).

    A sample without ``decode_steps`` is trained in left-to-right order (one token per
    step), as the reference does for a missing step map.

    Args:
        samples: the trajectories (checked with :func:`check_sample`).
        block_size: ``b`` for block models; None for full-attention models.
        shrink: merge ``s`` consecutive distinct steps (per block; per response for full attention).
        copies_per_row: noisy copies per row for block models (0 = all rounds of a sample).
        max_len: skip (and count) samples with ``P + R > max_len`` (0 = no limit).

    Returns:
        rows and :class:`RowStats`.
    """
    rows: list[Row] = []
    stats = RowStats(block_size=block_size or 0)
    for i, s, prompt, response in _admitted(samples, max_len, stats):
        P, R = len(prompt), len(response)
        steps = (torch.as_tensor(list(s.decode_steps), dtype=torch.long)
                 if s.decode_steps is not None else torch.arange(1, R + 1))
        blocks = response_blocks(P, R, block_size)
        ranks = step_ranks(shrink_steps(steps, blocks, shrink), blocks)
        trainable = torch.arange(R) < s.response_len
        rounds = [(k, m, t & trainable) for k, (m, t) in enumerate(rounds_from_ranks(ranks))]
        rounds = [r for r in rounds if r[2].any()]
        stats.copies += len(rounds)
        if block_size is None:
            for k, m, t in rounds:
                rows.append(full_row(prompt, response, m, t, mask_id, sample=i, round=k))
        else:
            for chunk in _chunks(rounds, copies_per_row):
                rows.append(block_row(prompt, response, [(m, t) for _, m, t in chunk], block_size,
                                      mask_id, sample=i, rounds=[k for k, _, _ in chunk]))
    return _finished(rows, stats)


def random_masks(n: int, lower: float, upper: float, generator: torch.Generator,
                 per_position: bool = True) -> torch.Tensor:
    """Bool ``[n]``: mask position ``j`` iff ``u_j <= p_j`` with ``p ~ U(lower, upper)``.

    ``per_position`` draws one ``p`` per position (block models, reference 4.9 / 7.1);
    otherwise one ``t`` for the whole row (full attention, reference 5 / 7.2).
    """
    k = n if per_position else 1
    p = lower + (upper - lower) * torch.rand(k, generator=generator)
    return torch.rand(n, generator=generator) <= p


@on_host
def build_masked_rows(samples: Sequence[TraceSample], *, block_size: int | None, mask_id: int,
                      lower: float, upper: float, generator: torch.Generator,
                      coupled: bool = False, times: int = 1, max_len: int = 0,
                      decode_block: int = 0) -> tuple[list[Row], RowStats]:
    """Random-masking rows (RL baselines ``random_masking``/``coupled``, block and random SFT).

    Block models: one copy with every response position masked with its own probability
    ``p ~ U(lower, upper)`` (reference 4.9, block SFT 7.1); ``coupled`` adds the
    complementary copy (masks and trains exactly the other positions) in the same row.
    Full attention: ``times`` rows per sample with one ``t ~ U(lower, upper)`` per row
    (reference 5, 7.2), plus the complement of each when ``coupled``.
    Full attention with ``decode_block`` (semi_ar SFT): each row's mask is instead a state
    of block-by-block decoding with blocks of ``decode_block``
    (:func:`semi_ar_state_mask`). Uniform random masking rarely shows the model a clean
    prefix followed by a masked rest, yet block-by-block decoding only ever asks it to
    fill a block from there.
    Only the first ``response_len`` positions are trained; later positions are masked
    or not like the others but never trained.
    """
    if decode_block and block_size is not None:
        raise ValueError("decode_block (decoding states) is for full-attention rows; block "
                         "models decode the blocks they train on")
    rows: list[Row] = []
    stats = RowStats(block_size=block_size or 0)
    for i, s, prompt, response in _admitted(samples, max_len, stats):
        R = len(response)
        trainable = torch.arange(R) < s.response_len
        for _ in range(times):
            m = (semi_ar_state_mask(R, decode_block, lower, upper, generator) if decode_block
                 else random_masks(R, lower, upper, generator, per_position=block_size is not None))
            copies = [(m, m & trainable)] + ([(~m, ~m & trainable)] if coupled else [])
            copies = [c for c in copies if c[1].any()]
            stats.copies += len(copies)
            if not copies:
                continue
            if block_size is None:
                rows += [full_row(prompt, response, a, t, mask_id, sample=i, round=k)
                         for k, (a, t) in enumerate(copies)]
            else:
                rows.append(block_row(prompt, response, copies, block_size, mask_id, sample=i))
    return _finished(rows, stats)


def semi_ar_state_mask(n: int, block: int, lower: float, upper: float,
                       generator: torch.Generator) -> torch.Tensor:
    """One state that semi-autoregressive decoding of a full-attention model visits, as a
    mask over ``n`` response positions: a block ``k`` drawn uniformly, the blocks before
    it clean (decoded), each position of block ``k`` masked with one probability
    ``p ~ U(lower, upper)`` (at least one), and every position after it masked (not yet
    decoded)."""
    k = int(torch.randint(-(-n // block), (1,), generator=generator))
    s0, s1 = k * block, min((k + 1) * block, n)
    m = torch.zeros(n, dtype=torch.bool)
    m[s0:s1] = random_masks(s1 - s0, lower, upper, generator, per_position=False)
    if not m[s0:s1].any():
        m[s0 + int(torch.randint(s1 - s0, (1,), generator=generator))] = True
    m[s1:] = True
    return m


# --------------------------------------------------------------------------- batches


def packed_visibility(block: torch.Tensor, segment: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Visibility ``[B, N, N]`` of packed block rows (True = query may attend to key).

    The rule of :func:`tracerl.models.masks.block_visibility` with one more condition: a
    noisy key is visible only to queries of the same copy (segment). With one copy it
    reduces to ``block_visibility`` (tested).

    Args:
        block: ``[B, N]`` block id; segment: ``[B, N]`` (0 clean, c+1 copy c); valid: ``[B, N]``.
    """
    qb, kb = block[:, :, None], block[:, None, :]
    qs, ks = segment[:, :, None], segment[:, None, :]
    clean_key = (ks == 0) & ((kb < qb) | ((kb == qb) & (qs == 0)))
    noisy_key = (ks > 0) & (ks == qs) & (kb == qb)
    return valid[:, None, :] & (clean_key | noisy_key)


@dataclass
class Batch:
    """Padded rows of one micro-batch, with the trained tokens flattened.

    Attributes:
        input_ids, position_ids: ``[B, N]`` (right-padded; pads are invalid keys).
        visible: ``[B, N, N]`` bool.
        target_row, target_col: ``[M]`` where the trained tokens sit; labels: ``[M]``.
        sample, resp_pos, round: ``[M]`` provenance of each trained token.
        tokens: per-target float tensors ``[M]`` (advantages, old_logprobs, weights, ...).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    visible: torch.Tensor
    target_row: torch.Tensor
    target_col: torch.Tensor
    labels: torch.Tensor
    sample: torch.Tensor
    resp_pos: torch.Tensor
    round: torch.Tensor
    tokens: dict[str, torch.Tensor]

    @property
    def num_targets(self) -> int:
        return int(self.labels.numel())

    @property
    def num_positions(self) -> int:
        return int(self.input_ids.numel())

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "visible": self.visible,
                "position_ids": self.position_ids, "target_row": self.target_row,
                "target_col": self.target_col, "labels": self.labels}

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """This batch on ``device`` (itself when it is there already)."""
        device = torch.device(device)
        if self.device == device:
            return self
        mv = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(**{f.name: mv(getattr(self, f.name)) for f in fields(self)
                        if f.name != "tokens"}, tokens={k: mv(v) for k, v in self.tokens.items()})


def collate(rows: Sequence[Row], pad_id: int, device: torch.device | str = HOST) -> Batch:
    """Right-pad rows into a :class:`Batch` on ``device`` and build each row's visibility.

    The padded ids, positions and per-target tensors are assembled on the host (rows live
    there) and cross to ``device`` once, pinned when it is a GPU; the ``[B, N, N]``
    visibility is built on ``device`` from them, never copied.
    """
    if not rows:
        raise ValueError("collate needs at least one row")
    device = torch.device(device)
    n = max(len(r) for r in rows)
    B = len(rows)
    ids = torch.full((B, n), pad_id, dtype=torch.long, device=HOST)
    pos = torch.zeros((B, n), dtype=torch.long, device=HOST)
    seg = torch.zeros((B, n), dtype=torch.long, device=HOST)
    length = torch.tensor([len(r) for r in rows], dtype=torch.long, device=HOST)
    for i, r in enumerate(rows):
        k = len(r)
        ids[i, :k], pos[i, :k], seg[i, :k] = r.input_ids, r.position_ids, r.segment
    keys = sorted(set().union(*(r.tokens for r in rows)))
    tokens = {}
    for k in keys:
        missing = [i for i, r in enumerate(rows) if k not in r.tokens]
        if missing:
            raise ValueError(f"token field {k!r} missing on rows {missing}")
        tokens[k] = torch.cat([r.tokens[k].to(HOST) for r in rows])
    host = dict(
        input_ids=ids, position_ids=pos, segment=seg, length=length,
        target_row=torch.cat([torch.full((r.num_targets,), i, dtype=torch.long, device=HOST)
                              for i, r in enumerate(rows)]),
        target_col=torch.cat([r.target_index for r in rows]),
        labels=torch.cat([r.labels for r in rows]),
        sample=torch.cat([torch.full((r.num_targets,), r.sample, dtype=torch.long, device=HOST)
                          for r in rows]),
        resp_pos=torch.cat([r.resp_pos for r in rows]),
        round=torch.cat([r.round for r in rows]),
        **{f"tok.{k}": v for k, v in tokens.items()},
    )
    pin = device.type == "cuda"
    d = {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin) for k, v in host.items()}
    valid = torch.arange(n, device=device)[None, :] < d.pop("length")[:, None]
    seg = d.pop("segment")
    if rows[0].attention == "full":
        visible = valid[:, None, :].expand(B, n, n).clone()
    else:
        b = rows[0].block_size
        block = torch.where(valid, torch.div(d["position_ids"], b, rounding_mode="floor"), -1)
        visible = packed_visibility(block, seg, valid)
    tokens = {k: d.pop(f"tok.{k}") for k in keys}
    return Batch(visible=visible, tokens=tokens, **d)
