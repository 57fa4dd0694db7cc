"""Batched, KV-cached block-diffusion sampling that records the decoding trace.

:func:`generate` is the rollout engine: a function of (model, prompts, config,
``torch.Generator``) that returns, per prompt, the generated token ids *and* the 1-based
global decode step at which each was unmasked, the trace TraceRL learns from (Wang et
al. 2025, arXiv 2509.06949; reference spec sections 2.3-2.6).

Conventions (shared with the trainer; see also :mod:`tracerl.models.masks`):

- **Absolute block alignment.** Position ``p`` (0 = first prompt token) is in block
  ``p // b``. A prompt of ``P`` tokens is prefilled through its ``A = floor(P/b)*b``
  whole blocks; the ``t = P mod b`` prompt-tail tokens open the first denoised block,
  whose other ``b - t`` positions are the first response slots (reference 2.3).
- **Budget.** ``max_tokens`` (a multiple of ``b``) counts positions from the start of
  that first denoised block: the sampler decodes exactly ``max_tokens / b`` whole blocks,
  so a response has at most ``max_tokens - (P mod b)`` tokens and every record ends on
  a block boundary. The canvas is ``A + max_tokens`` positions long.
- **Records.** ``response_ids`` / ``decode_steps`` / ``logprobs`` cover every decoded
  position from ``P`` to the end of the last decoded block, *including positions after
  EOS in that block* (they were context when earlier tokens were unmasked).
  ``response_len`` counts the tokens through the first stop token (``finish_reason
  "eos"``) or all of them (``"length"``). Stop tokens inside the prompt tail are
  ignored (reference bug 12.2.4).
- **Steps.** A sequence's step counter advances once per denoising forward that
  involves it, over all its blocks; commit and prefill forwards do not count. Tokens
  unmasked in the same forward share a step. ``logprobs`` hold
  ``log_softmax(raw logits)[token]`` at that step, before mask removal, temperature,
  top-k or top-p: what the trainer recomputes from the same context.
- **Rebuilding a context (the trainer's contract).** A response token at position ``q``
  unmasked at step ``v`` was scored with: the clean sequence (prompt and response) before
  its block, then its block with every position whose step is ``>= v`` masked (prompt
  tail never masked), block-causal/noisy visibility of :func:`block_visibility`,
  positions ``0..`` from the first prompt token. ``tests/test_sampling_model.py``
  re-scores recorded trajectories this way to 1e-5.
- **Sampling.** Per position: raw logits -> mask token removed -> temperature -> top-k
  -> top-p -> softmax (:func:`~tracerl.sampling.strategies.process_logits`); the
  candidate is drawn from that, and its probability there is the confidence the
  strategies rank by (reference 2.4). Temperature 0 takes the argmax and ranks by the
  temperature-1 probability (so low-confidence remasking still means something; the
  reference's ``top_k=1`` greedy makes every confidence 1).
- **Step limit.** A block ends when no mask is left; on its ``T``-th step every
  position still masked takes its candidate, so no mask token is ever committed (the
  reference engine commits masks in that case, spec 2.5).
- **KV cache (block models).** The clean whole prompt blocks are prefilled once; each
  denoising step runs only the current block over the cached prefix, without keeping
  its keys/values; a finished block's keys/values are computed once, clean, in the same
  forward as the next block's first denoising step (the reference's separate SAVING
  pass, folded). Rows that finish leave the batch and the cache.
- **Determinism.** One seed per prompt is drawn up front, in prompt order, from the
  caller's generator; each sequence samples only from its own generator. Outputs are
  therefore identical whether prompts run batched, one by one, or in any order (up to
  float reassociation of differently shaped matmuls, ~1e-6 on logits).

Full-attention families (LLaDA, Dream) run the same loop over a fixed canvas
``[prompt | masks]`` with bidirectional attention: semi-autoregressive blocks (same
alignment, same strategies, same record). Their record additionally covers the whole
canvas: positions after the EOS block, which were still ``[MASK]`` during every step the
sequence was decoded, hold ``pad_id`` with step ``last_step + 1`` and log-prob 0, so the
rule "position ``q`` is masked at step ``v`` iff ``decode_steps[q] >= v``" rebuilds every
context exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from tracerl.limits import canvas_length
from tracerl.models.cache import BlockKVCache
from tracerl.models.masks import block_ids, block_visibility, full_visibility
from tracerl.sampling.strategies import (
    STRATEGIES,
    draw_tokens,
    process_logits,
    transfer_schedule,
)

FULL_CACHES = ("none", "prefix")  # SamplingConfig.full_cache


@dataclass(frozen=True)
class SamplingConfig:
    """How to decode. Invalid values raise one ``ValueError`` listing every problem.

    Attributes:
        block_size: ``b``, tokens per block (the model's training block size, or the
            curriculum's).
        steps_per_block: ``T``, the maximum number of denoising steps per block.
        max_tokens: generation budget, a multiple of ``b`` (see the module docstring).
        strategy: one of :data:`~tracerl.sampling.strategies.STRATEGIES`.
        dynamic_threshold: confidence threshold of ``low_confidence_dynamic``.
        entropy_bound: cumulative-entropy bound of ``entropy_bounded``.
        temperature: ``0`` = greedy.
        top_k: ``0`` = off.
        top_p: ``1.0`` = off.
        batch_size: sequences decoded together.
        use_cache: block models only: KV-cache the clean prefix (False re-encodes
            ``[prefix | block]`` every step; it exists for tests and benchmarks).
        full_cache: full-attention models only. ``"none"`` runs the whole canvas every
            step (exact). ``"prefix"`` is the approximate prefix cache of Fast-dLLM (Wu et
            al. 2025, arXiv 2505.22618): the first step of each block runs the whole
            canvas and keeps the keys/values of the committed prefix; the block's later
            steps run only ``[block | rest of the canvas]`` over them. Bidirectional
            prefix states would change with the block's new tokens, so later steps are
            approximate; the trainer then recomputes the old log-probs.
        ignore_eos: never stop at a stop token (benchmarks: fixed work per sequence).
    """

    block_size: int = 4
    steps_per_block: int = 4
    max_tokens: int = 32
    strategy: str = "low_confidence_static"
    dynamic_threshold: float = 0.9
    entropy_bound: float = 0.35
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    batch_size: int = 64
    use_cache: bool = True
    ignore_eos: bool = False
    full_cache: str = "none"

    def __post_init__(self):
        p = []
        if self.block_size < 1:
            p.append(f"block_size must be >= 1, got {self.block_size}")
        if self.steps_per_block < 1:
            p.append(f"steps_per_block must be >= 1, got {self.steps_per_block}")
        if self.max_tokens < 1 or (self.block_size >= 1 and self.max_tokens % self.block_size):
            p.append(
                f"max_tokens ({self.max_tokens}) must be a positive multiple of block_size "
                f"({self.block_size}): the sampler decodes whole blocks; e.g. "
                f"{max(self.block_size, self.max_tokens // max(self.block_size, 1) * self.block_size)}"
            )
        if self.strategy not in STRATEGIES:
            p.append(STRATEGIES.problem(self.strategy, "strategy"))
        if self.full_cache not in FULL_CACHES:
            p.append(f"full_cache must be one of {', '.join(FULL_CACHES)}, got "
                     f"{self.full_cache!r}")
        if (self.strategy == "low_confidence_static" and self.block_size >= 1
                and self.steps_per_block > self.block_size):
            p.append(
                f"steps_per_block ({self.steps_per_block}) > block_size ({self.block_size}) "
                "leaves static steps that unmask nothing; use steps_per_block <= block_size"
            )
        if not 0.0 <= self.dynamic_threshold <= 1.0:
            p.append(f"dynamic_threshold must be in [0, 1], got {self.dynamic_threshold}")
        if self.entropy_bound <= 0:
            p.append(f"entropy_bound must be > 0, got {self.entropy_bound}")
        if self.temperature < 0:
            p.append(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            p.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            p.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            p.append(f"batch_size must be >= 1, got {self.batch_size}")
        if p:
            raise ValueError("invalid SamplingConfig:\n" + "\n".join(f"  - {m}" for m in p))


@dataclass(frozen=True)
class Trajectory:
    """One sampled response and its decoding trace (see the module docstring).

    Attributes:
        prompt_ids: the prompt, unpadded (``P`` ids).
        response_ids: decoded ids from position ``P`` to the end of the last decoded block.
        decode_steps: 1-based global decode step at which each position was unmasked.
        logprobs: raw-model log-probability of each token when it was unmasked.
        response_len: tokens that count (through EOS; ``len(response_ids)`` when cut by length).
        finish_reason: ``"eos"`` or ``"length"``.
        num_forward: model forward passes that involved this sequence: its denoising
            steps, plus 1 for its share of the prompt prefill (cached block models fold
            each block's commit into the next block's first denoising forward, and a
            finished sequence is not committed).
        block_size: the block size it was decoded with.
        attention: ``"block"`` or ``"full"``: the attention it was decoded with.
        sampling: the full decoding configuration (recorded with the trajectory: the
            trainer rebuilds contexts from the record, never from params).
    """

    prompt_ids: list[int]
    response_ids: list[int]
    decode_steps: list[int]
    logprobs: list[float]
    response_len: int
    finish_reason: Literal["eos", "length"]
    num_forward: int
    block_size: int
    attention: Literal["block", "full"]
    sampling: SamplingConfig

    @property
    def num_steps(self) -> int:
        """Denoising steps the sequence took: the largest decode step up to the end of the
        block that holds its last response token (full-attention records continue past
        it with never-decoded positions)."""
        n = len(self.decode_steps)
        if self.block_size and self.response_len:
            last = len(self.prompt_ids) + self.response_len - 1
            n = (last // self.block_size + 1) * self.block_size - len(self.prompt_ids)
        return max(self.decode_steps[:n], default=0)


def check_prompts(model, prompts: Sequence[Sequence[int]], cfg: SamplingConfig) -> None:
    """Raise one ``ValueError`` listing every prompt the model cannot decode under ``cfg``."""
    p = []
    context = getattr(model.config, "max_position_embeddings", None)
    vocab = getattr(model.config, "vocab_size", None)
    for i, prompt in enumerate(prompts):
        n = len(prompt)
        if n == 0:
            p.append(f"prompt {i} is empty: a response needs at least one prompt token")
            continue
        need = canvas_length(n, cfg.block_size, cfg.max_tokens)
        if context is not None and need > context:
            p.append(
                f"prompt {i} has {n} tokens: with max_tokens={cfg.max_tokens} its canvas needs "
                f"{need} positions > the model's context of {context}; shorten the prompt or "
                "lower max_tokens"
            )
        if model.tokens.mask_id in prompt:
            p.append(f"prompt {i} contains the mask token id {model.tokens.mask_id}")
        if vocab is not None and (min(prompt) < 0 or max(prompt) >= vocab):
            p.append(f"prompt {i} has token ids outside the vocabulary [0, {vocab})")
        if len(p) >= 10:
            p.append("...")
            break
    if p:
        raise ValueError("cannot decode these prompts:\n" + "\n".join(f"  - {m}" for m in p))


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
    *,
    progress: Callable[[int], None] | None = None,
    compile: bool = False,
) -> list[Trajectory]:
    """Sample one response per prompt with its decoding trace.

    Prompts are decoded in batches of ``cfg.batch_size``, grouped by length (less
    padding; :func:`plan_batches`); results come back in prompt order. Since every
    sequence has its own random stream, grouping changes nothing in the outputs.

    Args:
        model: a :class:`~tracerl.models.DiffusionLM` (block or full attention).
        prompts: token ids, unpadded, one list per response to sample.
        cfg: the decoding configuration.
        generator: the caller's random source (None: a fresh ``torch.Generator()``,
            whose default seed is fixed).
        progress: called with the number of sequences finished after each batch.
        compile: run the model's forwards through ``torch.compile``
            (:func:`compiled_forward`); the same trajectories up to float reassociation.

    Returns:
        One :class:`Trajectory` per prompt, in order.

    Raises:
        ValueError: empty prompt, prompt too long for the context, bad ids.

    Example:
        >>> from tracerl.models import tiny_model
        >>> model, tok = tiny_model()
        >>> cfg = SamplingConfig(block_size=4, steps_per_block=4, max_tokens=8)
        >>> [t] = generate(model, [tok.encode("1+1=")], cfg, torch.Generator().manual_seed(0))
        >>> len(t.response_ids), sorted(set(t.decode_steps)) == list(range(1, t.num_steps + 1))
        (8, True)
    """
    done = generate_batches(model, prompts, cfg, generator, progress=progress, compile=compile)
    return [done[i] for i in range(len(prompts))]


def plan_batches(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """The batches :func:`generate` decodes ``prompts`` in: prompt indices sorted by
    length (stable: ties keep prompt order), cut every ``batch_size``. A function of the
    prompt lengths only, so every shard of a sharded rollout computes the same plan.

    >>> plan_batches([[1, 2, 3], [1], [1, 2], [1]], 2)
    [[1, 3], [2, 0]]
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def prompt_seeds(n: int, generator: torch.Generator | None = None) -> list[int]:
    """One seed per prompt, drawn up front in prompt order from ``generator`` (None: a
    fresh ``torch.Generator()``): sequence ``i`` samples only from ``seeds[i]``."""
    if generator is None:
        generator = torch.Generator()
    if n == 0:
        return []
    return torch.randint(0, 2**62, (n,), generator=generator, device=generator.device).tolist()


def generate_batches(
    model,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
    batches: Sequence[int] | None = None,
    *,
    progress: Callable[[int], None] | None = None,
    compile: bool = False,
) -> dict[int, Trajectory]:
    """Decode only the batches ``batches`` (indices into :func:`plan_batches`; None: all)
    of the same plan :func:`generate` runs, with the same per-prompt seeds: a shard of a
    rollout. Returns ``{prompt index: trajectory}`` for the prompts of those batches.

    Every batch has the prompts, padding and seeds it has in the unsharded run, so the
    union of the shards' results is the unsharded result bit for bit (whatever the
    backend's matmuls do with batch composition).
    """
    prompts = [list(map(int, p)) for p in prompts]
    check_prompts(model, prompts, cfg)
    seeds = prompt_seeds(len(prompts), generator)
    plan = plan_batches(prompts, cfg.batch_size)
    todo = range(len(plan)) if batches is None else batches
    bad = [j for j in todo if not 0 <= j < len(plan)]
    if bad:
        raise ValueError(f"batches {bad} do not exist: the plan has {len(plan)} batches")
    out: dict[int, Trajectory] = {}
    for j in todo:
        chunk = plan[j]
        trajs = decode_batch(model, [prompts[i] for i in chunk], [seeds[i] for i in chunk], cfg,
                             compile=compile)
        out.update(zip(chunk, trajs))
        if progress is not None:
            progress(len(chunk))
    return out


def compiled_forward(model) -> Callable:
    """``torch.compile`` of ``model``'s forward (inductor, dynamic shapes), made once per
    model and kept on it. Tensor arguments are passed contiguous: the sampler hands over
    column slices of its canvas, whose strides Dynamo otherwise guards on (recompiling as
    the cached prefix grows). Graphs are still specialised on the Python values of a call
    (``keep``, ``return_logits``) and on some shapes, so a decode compiles a few graphs:
    prefill, denoise, denoise-with-commit, and a few recompilations
    (``bench/bench_compile.py`` counts them: 5 on the embedded default)."""
    fn = model.__dict__.get("_tracerl_compiled")
    if fn is None:
        graph = torch.compile(model, dynamic=True)

        def fn(*args, **kwargs):
            args = tuple(a.contiguous() if torch.is_tensor(a) else a for a in args)
            kwargs = {k: v.contiguous() if torch.is_tensor(v) else v for k, v in kwargs.items()}
            return graph(*args, **kwargs)

        model.__dict__["_tracerl_compiled"] = fn
    return fn


@torch.inference_mode()
def decode_batch(model, prompts: list[list[int]], seeds: list[int],
                 cfg: SamplingConfig, *, compile: bool = False) -> list[Trajectory]:
    """Decode one batch (prompts already checked); sequence ``i`` samples from ``seeds[i]``.

    The whole sampler, step by step (reference 2.3-2.6). ``compile``: the forwards run
    through :func:`compiled_forward`.
    """
    run = compiled_forward(model) if compile else model
    dev = model.device
    tokens = model.tokens
    b, T, M = cfg.block_size, cfg.steps_per_block, cfg.max_tokens
    full = model.family.attention == "full"
    cached = cfg.use_cache and not full
    prefix = full and cfg.full_cache == "prefix"  # approximate (SamplingConfig.full_cache)
    strategy = STRATEGIES.get(cfg.strategy)
    schedule = transfer_schedule(b, T)
    stop_ids = torch.tensor(tokens.stop_ids, device=dev)

    # 1. Canvas. Row i is left-padded by C - A_i columns (A_i = floor(P_i/b)*b, C = max A_i)
    #    so that block j of every row occupies columns [C + j*b, C + (j+1)*b). Positions are
    #    per row (0 = first prompt token); pad columns are invalid keys.
    B = len(prompts)
    A = [len(p) // b * b for p in prompts]
    C = max(A)
    W = C + M
    ids = torch.full((B, W), tokens.mask_id, dtype=torch.long, device=dev)
    valid = torch.zeros(B, W, dtype=torch.bool, device=dev)
    pos = torch.zeros(B, W, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        off = C - A[i]
        ids[i, :off] = tokens.pad_id
        ids[i, off:off + len(p)] = torch.tensor(p, device=dev)
        valid[i, off:] = True
        pos[i, off:] = torch.arange(W - off, device=dev)
    blk = block_ids(pos, b, valid)
    first = torch.tensor([C + len(p) - A[i] for i, p in enumerate(prompts)], device=dev)
    step_of = torch.zeros(B, W, dtype=torch.long, device=dev)  # decode step per column
    logp = torch.zeros(B, W, dtype=torch.float32, device=dev)
    nstep = torch.zeros(B, dtype=torch.long, device=dev)
    nfwd = torch.zeros(B, dtype=torch.long, device=dev)
    gens = [torch.Generator(device=dev).manual_seed(s) for s in seeds]
    rows = list(range(B))  # batch row -> index into prompts (rows leave when finished)
    out: list[Trajectory | None] = [None] * B

    # 2. Prefill: the clean whole blocks of every prompt, once, block-causal, into the cache.
    cache = None
    if prefix:
        cache = BlockKVCache.for_model(model.config, B, W, model.compute_dtype(), dev)
    if cached:
        cache = BlockKVCache.for_model(model.config, B, W, model.compute_dtype(), dev)
        if C:
            vis = _visibility(blk, valid, q=(0, C), keys=C, noisy_from=None)
            run(ids[:, :C], visible=vis, position_ids=pos[:, :C], cache=cache.begin(True),
                return_logits=False)
            cache.end()
            nfwd += torch.tensor([a > 0 for a in A], device=dev)

    for j in range(M // b):
        s0, s1 = C + j * b, C + (j + 1) * b
        masked = ids[:, s0:s1] == tokens.mask_id  # [B, b]; the prompt tail is not masked

        # 3. Denoise block j: at most T steps; each step every row that still has masks
        #    draws candidates, and its strategy chooses which masked positions take them.
        #    Cached: the first step also commits block j-1 (see _denoise_logits).
        for s in range(T):
            act = masked.any(-1).nonzero().squeeze(-1)  # rows still denoising
            if act.numel() == 0:
                break
            if prefix:
                logits = _full_prefix_logits(run, ids, pos, valid, s0, s1, act, cache,
                                             refresh=s == 0)
            else:
                commit = cached and s == 0 and j > 0
                logits = _denoise_logits(run, ids, pos, blk, valid, s0, s1, act, cache, full,
                                         commit)
            probs = process_logits(logits, tokens.mask_id, cfg.temperature, cfg.top_k,
                                   cfg.top_p)  # [R, b, V]
            x0 = draw_tokens(probs, [gens[r] for r in act.tolist()], cfg.temperature == 0)
            conf = probs.gather(-1, x0[..., None]).squeeze(-1)  # [R, b]
            m = masked[act]
            if s == T - 1:  # last allowed step: every remaining mask takes its candidate
                sel = m
            else:
                sel = strategy(conf, probs, m, schedule[s], cfg.dynamic_threshold,
                               cfg.entropy_bound)
            # raw log-prob of the candidate: logit - logsumexp (no [R, b, V] log-softmax)
            raw = logits.gather(-1, x0[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)
            nstep[act] += 1
            nfwd[act] += 1
            ids[act, s0:s1] = torch.where(sel, x0, ids[act, s0:s1])
            step_of[act, s0:s1] = torch.where(sel, nstep[act, None], step_of[act, s0:s1])
            logp[act, s0:s1] = torch.where(sel, raw, logp[act, s0:s1])
            masked[act] = m & ~sel

        # 4. Stop: the first stop token among this block's response positions ends a row.
        col = torch.arange(s0, s1, device=dev)
        is_stop = torch.isin(ids[:, s0:s1], stop_ids) & (col[None] >= first[:, None])
        if cfg.ignore_eos:
            is_stop.zero_()
        hit = is_stop.any(-1)
        done = hit | (j == M // b - 1)
        for r in done.nonzero().squeeze(-1).tolist():
            end = s1
            if hit[r]:
                n = int(s0 + is_stop[r].int().argmax() - first[r]) + 1
                reason = "eos"
            else:
                n, reason = s1 - int(first[r]), "length"
            if full and end < W:  # never-decoded canvas: masks during every step (docstring)
                ids[r, end:] = tokens.pad_id
                step_of[r, end:] = nstep[r] + 1
                end = W
            f = int(first[r])
            out[rows[r]] = Trajectory(
                prompt_ids=prompts[rows[r]],
                response_ids=ids[r, f:end].tolist(),
                decode_steps=step_of[r, f:end].tolist(),
                logprobs=logp[r, f:end].tolist(),
                response_len=n,
                finish_reason=reason,
                num_forward=int(nfwd[r]),
                block_size=b,
                attention="full" if full else "block",
                sampling=cfg,
            )
        if done.all():
            break
        if done.any():  # 5. Drop finished rows from the batch (and the cache).
            keep = (~done).nonzero().squeeze(-1)
            ids, valid, pos, blk, first, step_of, logp, nstep, nfwd = (
                t[keep] for t in (ids, valid, pos, blk, first, step_of, logp, nstep, nfwd))
            gens = [gens[r] for r in keep.tolist()]
            rows = [rows[r] for r in keep.tolist()]
            if cache is not None:
                cache.select(keep)
    assert all(t is not None for t in out), "every row finishes by the last block"
    return out  # type: ignore[return-value]


def _full_prefix_logits(model, ids, pos, valid, s0, s1, act, cache,
                        refresh: bool) -> torch.Tensor:
    """Float32 logits ``[R, b, V]`` of block ``[s0, s1)`` for rows ``act``, full attention
    with the approximate prefix cache (``SamplingConfig.full_cache == "prefix"``).

    ``refresh`` (a block's first step): the whole canvas, bidirectional, storing every
    key/value, then the cache keeps the prefix ``[0, s0)`` (these logits are exact). Later
    steps: ``[s0, W)`` over the cached prefix and themselves. The whole batch runs (the
    cache is batch-wide); the active rows are kept.
    """
    W = ids.shape[1]
    if refresh:
        cache.length = 0
        out = model(ids, visible=full_visibility(valid, W), position_ids=pos,
                    cache=cache.begin(True), keep=slice(s0, s1)).logits
        cache.end()
        cache.length = s0
    else:
        out = model(ids[:, s0:], visible=full_visibility(valid, W - s0), position_ids=pos[:, s0:],
                    cache=cache.begin(False), keep=slice(0, s1 - s0)).logits
        cache.end()
    return out[act].float()


def _visibility(blk, valid, *, q: tuple[int, int], keys: int,
                noisy_from: int | None) -> torch.Tensor:
    """Block-diffusion visibility ``[B, q1-q0, keys]`` of queries ``q`` over key columns
    ``[0, keys)``; columns ``>= noisy_from`` form the noisy stream (None: all clean)."""
    kb, kv = blk[:, :keys], valid[:, :keys]
    kn = torch.zeros_like(kv)
    if noisy_from is not None:
        kn[:, noisy_from:] = True
    return block_visibility(blk[:, q[0]:q[1]], kn[:, q[0]:q[1]], kb, kn, kv)


def _denoise_logits(model, ids, pos, blk, valid, s0, s1, act, cache, full,
                    commit: bool) -> torch.Tensor:
    """Float32 logits ``[R, b, V]`` of the current block (columns ``[s0, s1)``) for rows ``act``.

    - cached: the block, noisy, over the committed prefix in ``cache``; its keys/values
      are scratch (``begin(False)``). The whole batch runs; the active rows are kept.
      With ``commit`` (first step of a block after the first) the finished previous
      block runs in the same forward, clean, in front of the noisy block: it sees the
      prefix and itself, the noisy block sees the prefix, the clean previous block and
      itself (``block_visibility``), and only the clean block's keys/values are kept.
      This is the reference's separate SAVING pass (spec 2.3, step 5) folded into the
      next denoising pass: one forward fewer per block, the same logits;
    - uncached block model: one forward of ``[prefix | block]`` with the block mask;
    - full attention: one forward of the whole canvas, bidirectional.
    """
    b = s1 - s0
    if cache is not None:
        q0 = s0 - b if commit else s0
        vis = _visibility(blk, valid, q=(q0, s1), keys=s1, noisy_from=s0)
        logits = model(ids[:, q0:s1], visible=vis, position_ids=pos[:, q0:s1],
                       cache=cache.begin(commit), keep=slice(s0 - q0, None)).logits
        cache.end()
        if commit:
            cache.length -= b  # keep the clean block only; the noisy keys are scratch
        return logits[act].float()
    if full:
        v = valid[act]
        vis = full_visibility(v, v.shape[1])
        return model(ids[act], visible=vis, position_ids=pos[act],
                     keep=slice(s0, s1)).logits.float()
    vis = _visibility(blk[act], valid[act], q=(0, s1), keys=s1, noisy_from=s0)
    return model(ids[act, :s1], visible=vis, position_ids=pos[act, :s1],
                 keep=slice(s0, s1)).logits.float()
