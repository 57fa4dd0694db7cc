"""One RL (or SFT) update: rows -> old log-probs / values -> optimizer steps.

These functions compose the pure pieces (:mod:`~tracerl.rl.rows`,
:mod:`~tracerl.rl.losses`, :mod:`~tracerl.rl.advantages`) around a
:class:`~tracerl.rl.trainer.Trainer`. Order within an RL iteration (reference spec 6.6):
:func:`value_update` first (advantages from the pre-update values, then the value
regression), then :func:`policy_update` with the token advantages it returned.

Batching: an optimizer step takes ``micro_batch * grad_accum * world_size`` rows, split
into ``grad_accum`` micro-batches per process; normalisers (trained tokens, or rows and
padded length) are those of the whole step, so any split gives the same gradient.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from tracerl.models import DiffusionLM, weights_digest
from tracerl.rl.advantages import outcome_token_rewards, step_gae
from tracerl.rl.losses import explained_variance, sft_loss, trace_rl_loss, value_loss
from tracerl.rl.rows import (
    Batch,
    Row,
    RowStats,
    TraceSample,
    build_masked_rows,
    build_trace_rows,
    check_sample,
    collate,
    response_blocks,
    shrink_steps,
)
from tracerl.rl.scoring import TokenScorer
from tracerl.rl.trainer import Trainer

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class PolicyConfig:
    """How rows are built and the policy loss computed (stage CLIs fill it from params).

    ``kl_target``: ``old`` pulls towards the pre-update policy (the reference, spec 4.6),
    ``reference`` towards a frozen reference model passed to :func:`policy_update`.
    ``normalize``: ``tokens`` (default) or ``padded`` (the reference's ``1/(B L1)``).
    """

    method: str = "trace_rl"  # a key of ROW_BUILDERS
    eps: float = 0.2
    beta: float = 0.0
    kl_estimator: Literal["k1", "k3"] = "k3"
    kl_target: Literal["old", "reference"] = "old"
    normalize: Literal["tokens", "padded"] = "tokens"
    shrink: int = 1
    copies_per_row: int = 0  # noisy copies per row (0 = every round of a sample)
    max_len: int = 0  # skip samples with prompt + response longer than this (0 = no limit)
    lower_p: float = 0.1  # random_masking / coupled mask probability range
    upper_p: float = 0.9
    mask_times: int = 1  # random_masking / coupled rows per sample (full attention)
    epochs: int = 1
    shuffle: bool = True
    use_recorded_logprobs: bool = True  # old log-probs from the rollout when weights match


@dataclass(frozen=True)
class ValueConfig:
    gamma: float = 1.0
    lam: float = 1.0
    clip: float = 0.2
    normalize: Literal["tokens", "padded"] = "tokens"
    shrink: int = 1
    copies_per_row: int = 0
    max_len: int = 0
    epochs: int = 1
    shuffle: bool = True


@dataclass(frozen=True)
class SFTConfig:
    """``semi_ar``: block SFT (per-position mask probability in [lower_p, upper_p]);
    ``trace``: TraceRL rounds from given step maps; ``random_masking``: full-attention SFT
    (one mask ratio per row, ``mask_times`` rows per example)."""

    method: Literal["semi_ar", "trace", "random_masking"] = "semi_ar"
    lower_p: float = 0.1
    upper_p: float = 0.9
    shrink: int = 1
    copies_per_row: int = 0
    mask_times: int = 1
    max_len: int = 0
    normalize: Literal["tokens", "padded"] = "tokens"


# --------------------------------------------------------------------------- rows


RowBuilder = Callable[[Sequence[TraceSample], DiffusionLM, PolicyConfig, torch.Generator],
                      tuple[list[Row], RowStats]]


def _block(lm: DiffusionLM) -> int | None:
    return lm.block_size if lm.family.attention == "block" else None


def _trace(samples, lm, cfg, g):
    return build_trace_rows(samples, block_size=_block(lm), mask_id=lm.tokens.mask_id,
                            shrink=cfg.shrink, copies_per_row=cfg.copies_per_row,
                            max_len=cfg.max_len)


def _masked(coupled: bool) -> RowBuilder:
    def build(samples, lm, cfg, g):
        return build_masked_rows(samples, block_size=_block(lm), mask_id=lm.tokens.mask_id,
                                 lower=cfg.lower_p, upper=cfg.upper_p, generator=g,
                                 coupled=coupled, times=cfg.mask_times, max_len=cfg.max_len)
    return build


ROW_BUILDERS: dict[str, RowBuilder] = {
    "trace_rl": _trace,  # TraceRL (spec 4.4 / 5)
    "random_masking": _masked(False),  # baseline (spec 4.9)
    "coupled": _masked(True),  # baseline with complementary masks (spec 4.9)
}


def get_row_builder(name: str) -> RowBuilder:
    if name not in ROW_BUILDERS:
        raise ValueError(f"unknown policy method {name!r}; valid: {', '.join(ROW_BUILDERS)}")
    return ROW_BUILDERS[name]


def _num_copies(r: Row) -> int:
    return int(r.round.unique().numel())


def _dummy(r: Row) -> Row:
    """A row that runs a forward but trains nothing (keeps ranks in lockstep)."""
    return replace(r, tokens={**r.tokens, "mask": torch.zeros(r.num_targets)})


def split_step(step_rows: Sequence[Row], grad_accum: int, world: int, rank: int) -> list[list[Row]]:
    """This rank's ``grad_accum`` micro-batches of one step (contiguous near-equal parts;
    an empty part is replaced by a zero-weight dummy row)."""
    n = world * grad_accum
    bounds = [round(i * len(step_rows) / n) for i in range(n + 1)]
    parts = [list(step_rows[bounds[i]:bounds[i + 1]]) for i in range(n)]
    mine = parts[rank * grad_accum:(rank + 1) * grad_accum]
    return [p if p else [_dummy(step_rows[0])] for p in mine]


def score_rows(trainer: Trainer, rows: Sequence[Row], pad_id: int, micro_batch: int,
               progress: bool = False) -> list:
    """No-grad module outputs per row: a tensor ``[M_r]`` (or a tuple of them) per row."""
    out: list = []
    chunks = [rows[i:i + micro_batch] for i in range(0, len(rows), micro_batch)]
    for chunk in _progress(chunks, progress, "score"):
        res = trainer.score([collate(chunk, pad_id)])[0]
        sizes = [r.num_targets for r in chunk]
        if isinstance(res, tuple):
            split = [t.split(sizes) for t in res]
            out.extend(tuple(s[i] for s in split) for i in range(len(chunk)))
        else:
            out.extend(res.split(sizes))
    return out


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, leave=False)


def train_rows(trainer: Trainer, rows: list[Row], make_loss: Callable[[list[Row]], Callable],
               pad_id: int, *, epochs: int = 1, shuffle: bool = True, progress: bool = False
               ) -> list[dict[str, float]]:
    """Optimizer steps over ``rows`` for ``epochs`` passes; returns per-step metrics.

    ``make_loss(step_rows)`` returns the loss function of one step (its normalisers are
    those of ``step_rows``, the step's rows on every rank).
    """
    c = trainer.cfg
    per_step = c.micro_batch * c.grad_accum * trainer.world_size
    history = []
    for _ in range(epochs):
        order = (torch.randperm(len(rows), generator=trainer.generator).tolist() if shuffle
                 else list(range(len(rows))))
        steps = [[rows[i] for i in order[s:s + per_step]] for s in range(0, len(order), per_step)]
        for step_rows in _progress(steps, progress, trainer.kind):
            loss_fn = make_loss(step_rows)
            mbs = split_step(step_rows, c.grad_accum, trainer.world_size, trainer.rank)
            history.append(trainer.step([collate(mb, pad_id) for mb in mbs], loss_fn))
    return history


def summarize(history: list[dict[str, float]], prefix: str = "") -> dict[str, float]:
    """Mean over steps (max for ``*_max``, sums for tokens/seconds, last lr)."""
    if not history:
        return {}
    out: dict[str, float] = {}
    for k in history[0]:
        vals = [h[k] for h in history if k in h]
        if k.endswith("_max"):
            out[k] = max(vals)
        elif k in ("tokens", "positions", "seconds", "skipped"):
            out[k] = float(sum(vals))
        elif k == "lr":
            out[k] = vals[-1]
        else:
            finite = [v for v in vals if math.isfinite(v)]
            out[k] = sum(finite) / len(finite) if finite else float("nan")
    out["tokens_per_s"] = out.get("tokens", 0.0) / out["seconds"] if out.get("seconds") else 0.0
    out["steps"] = float(len(history))
    return {f"{prefix}{k}": v for k, v in out.items()}


# --------------------------------------------------------------------------- log-probs


def trajectory_logprobs(lm: DiffusionLM, samples: Sequence[TraceSample], *, shrink: int = 1,
                        copies_per_row: int = 0, micro_batch: int = 8) -> list[torch.Tensor]:
    """The trainer's log-prob of every response token, ``[response_len]`` per sample.

    With ``shrink = 1`` and the sampling weights these equal the sampler's recorded
    log-probs (fp32): each token is scored in the block state it was unmasked from.
    """
    rows, _ = build_trace_rows(samples, block_size=_block(lm), mask_id=lm.tokens.mask_id,
                               shrink=shrink, copies_per_row=copies_per_row)
    scorer = TokenScorer(lm)
    was = lm.training
    lm.eval()
    out = [torch.full((s.response_len,), float("nan")) for s in samples]
    with torch.no_grad():
        for i in range(0, len(rows), micro_batch):
            chunk = rows[i:i + micro_batch]
            b = collate(chunk, lm.tokens.pad_id)
            logp, _ = scorer(**b.model_inputs())
            for s, j, v in zip(b.sample.tolist(), b.resp_pos.tolist(), logp.tolist()):
                out[s][j] = v
    lm.train(was)
    return out


def _lm_of(trainer: Trainer) -> DiffusionLM:
    m = trainer.module
    return m.lm if isinstance(m, TokenScorer) else m.vm.lm


# --------------------------------------------------------------------------- policy


def prepare_policy_rows(trainer: Trainer, samples: Sequence[TraceSample], cfg: PolicyConfig, *,
                        ref_model: DiffusionLM | None = None, progress: bool = False
                        ) -> tuple[list[Row], dict[str, float]]:
    """Rows with ``advantages``, ``old_logprobs``, ``mask`` (and ``ref_logprobs``) attached.

    Old log-probs come from the rollout record when every sample carries log-probs and a
    ``policy_id`` equal to the digest of the current weights, the rows are TraceRL rounds
    with ``shrink = 1`` and training runs in fp32 (then they are exactly the states the
    sampler scored, saving a forward pass); otherwise they are recomputed.
    """
    lm = _lm_of(trainer)
    rows, stats = get_row_builder(cfg.method)(samples, lm, cfg, trainer.generator)
    info = stats.as_metrics()
    if stats.skipped_too_long:
        log.warning("skipped %d trajectories longer than max_len=%d", stats.skipped_too_long,
                    cfg.max_len)
    if not rows:
        return rows, info
    recorded = (cfg.use_recorded_logprobs and cfg.method == "trace_rl" and cfg.shrink == 1
                and not trainer.cfg.bf16 and trainer.cfg.zero_stage != 3  # (partitioned weights)
                and all(s.logprobs is not None and s.policy_id for s in samples))
    if recorded:
        digest = weights_digest(lm)
        recorded = all(s.policy_id == digest for s in samples)
    if recorded:
        for r in rows:
            lp = torch.as_tensor(list(samples[r.sample].logprobs), dtype=torch.float32)
            r.tokens["old_logprobs"] = lp[r.resp_pos]
    else:
        for r, (lp, _) in zip(rows, score_rows(trainer, rows, lm.tokens.pad_id,
                                               trainer.cfg.micro_batch, progress)):
            r.tokens["old_logprobs"] = lp.float()
    info["old_logprobs_recorded"] = float(recorded)
    if cfg.beta > 0 and cfg.kl_target == "reference":
        if ref_model is None:
            raise ValueError("policy kl_target='reference' with beta > 0 needs a reference model")
        ref = Trainer(TokenScorer(ref_model), replace(trainer.cfg, zero_stage=0), kind="ref")
        for r, (lp, _) in zip(rows, score_rows(ref, rows, lm.tokens.pad_id,
                                               trainer.cfg.micro_batch, progress)):
            r.tokens["ref_logprobs"] = lp.float()
    for r in rows:
        s = samples[r.sample]
        if s.token_advantages is not None:
            adv = torch.as_tensor(list(s.token_advantages), dtype=torch.float32)[r.resp_pos]
        else:
            adv = torch.full((r.num_targets,), float(s.advantage))
        r.tokens["advantages"] = adv
        r.tokens["mask"] = torch.ones(r.num_targets)
    return rows, info


def _padded_len(samples: Sequence[TraceSample]) -> int:
    return max((s.response_len for s in samples), default=1)


def policy_loss_factory(cfg: PolicyConfig, padded_len: int) -> Callable[[list[Row]], Callable]:
    """``step_rows -> loss_fn`` for :func:`train_rows` (normalisers of the whole step)."""

    def make(step_rows: list[Row]):
        num_tokens = float(sum(float(r.tokens["mask"].sum()) for r in step_rows))
        num_rows = float(sum(_num_copies(r) for r in step_rows))

        def loss_fn(out, b: Batch):
            logp, entropy = out
            t = b.tokens
            loss, m = trace_rl_loss(
                logp[None], t["old_logprobs"][None], t["advantages"][None], t["mask"][None],
                eps=cfg.eps, beta=cfg.beta, kl_estimator=cfg.kl_estimator,
                ref_logprobs=t["ref_logprobs"][None] if "ref_logprobs" in t else None,
                normalize=cfg.normalize, num_tokens=max(num_tokens, 1.0), num_rows=num_rows,
                padded_len=padded_len)
            n = t["mask"].sum().clamp(min=1)
            m["entropy"] = float((entropy * t["mask"]).sum() / n)
            return loss, m

        return loss_fn

    return make


def policy_update(trainer: Trainer, samples: Sequence[TraceSample], cfg: PolicyConfig, *,
                  ref_model: DiffusionLM | None = None, progress: bool = False
                  ) -> dict[str, float]:
    """One TraceRL (or baseline) policy update over an iteration's samples.

    An empty batch (every group filtered) makes no step and says so in the metrics
    (``empty_batch = 1``) instead of crashing (reference issue #20).

    Returns:
        metrics: loss, policy_loss, kl, clip_fraction, ratio_mean, ratio_max, entropy,
        grad_norm, lr, tokens, tokens_per_s, steps, skipped, and row counts.
    """
    rows, info = prepare_policy_rows(trainer, samples, cfg, ref_model=ref_model,
                                     progress=progress)
    if not rows:
        log.warning("policy update skipped: no trainable rows (%d samples)", len(samples))
        return {**info, "empty_batch": 1.0, "steps": 0.0}
    lm = _lm_of(trainer)
    history = train_rows(trainer, rows, policy_loss_factory(cfg, _padded_len(samples)),
                         lm.tokens.pad_id, epochs=cfg.epochs, shuffle=cfg.shuffle,
                         progress=progress)
    trainer.counters["updates"] += 1
    return {**info, **summarize(history), "empty_batch": 0.0}


@torch.no_grad()
def evaluate_policy_loss(trainer: Trainer, rows: list[Row], cfg: PolicyConfig,
                         padded_len: int) -> float:
    """The policy loss of ``rows`` taken as ONE step, without updating (for tests/diagnostics)."""
    loss_fn = policy_loss_factory(cfg, padded_len)(rows)
    total = 0.0
    pad = _lm_of(trainer).tokens.pad_id
    for i in range(0, len(rows), trainer.cfg.micro_batch):
        b = collate(rows[i:i + trainer.cfg.micro_batch], pad)
        total += loss_fn(trainer.score([b])[0], b)[0].item()
    return total


# --------------------------------------------------------------------------- value


def value_update(trainer: Trainer, samples: Sequence[TraceSample], cfg: ValueConfig, *,
                 train: bool = True, progress: bool = False
                 ) -> tuple[list[list[float] | None], list[list[float] | None], dict[str, float]]:
    """GAE over decode steps with the pre-update values, then the clipped value regression.

    Rewards: a sample's ``token_rewards`` (process reward) when present, else its
    sequence ``advantage`` on the tokens of its last decode step (outcome; spec 6.4).
    The value of token ``j`` is read at its noisy position in the row that trains it.

    Returns:
        ``(token_advantages, token_returns, metrics)``: per sample a list of
        ``response_len`` floats (None for skipped samples); metrics: value_loss,
        explained_var (old values vs returns), value_clip_fraction, adv_mean, adv_std, ...
    """
    lm = _lm_of(trainer)
    for i, s in enumerate(samples):
        check_sample(s, i)
    rows, stats = build_trace_rows(samples, block_size=_block(lm), mask_id=lm.tokens.mask_id,
                                   shrink=cfg.shrink, copies_per_row=cfg.copies_per_row,
                                   max_len=cfg.max_len)
    info = stats.as_metrics()
    n = len(samples)
    advs: list[list[float] | None] = [None] * n
    rets: list[list[float] | None] = [None] * n
    if not rows:
        log.warning("value update skipped: no trainable rows (%d samples)", n)
        return advs, rets, {**info, "empty_batch": 1.0}
    old = score_rows(trainer, rows, lm.tokens.pad_id, trainer.cfg.micro_batch, progress)
    values = {i: torch.full((samples[i].response_len,), float("nan")) for i in {r.sample for r in rows}}
    for r, v in zip(rows, old):
        values[r.sample][r.resp_pos] = v.float()
    all_v, all_r, all_a = [], [], []
    for i, v in values.items():
        s = samples[i]
        if torch.isnan(v).any():
            raise AssertionError(f"sample {i}: a trainable token was not valued exactly once")
        R = len(s.response_ids)
        steps = (torch.as_tensor(list(s.decode_steps)) if s.decode_steps is not None
                 else torch.arange(1, R + 1))
        steps = shrink_steps(steps, response_blocks(len(s.prompt_ids), R, _block(lm)),
                             cfg.shrink)[: s.response_len]
        rewards = (torch.as_tensor(list(s.token_rewards), dtype=torch.float32)
                   if s.token_rewards is not None else outcome_token_rewards(s.advantage, steps))
        ret, adv = step_gae(rewards, v, steps, gamma=cfg.gamma, lam=cfg.lam)
        advs[i], rets[i] = adv.tolist(), ret.tolist()
        all_v.append(v)
        all_r.append(ret)
        all_a.append(adv)
    v_cat, r_cat, a_cat = torch.cat(all_v), torch.cat(all_r), torch.cat(all_a)
    info.update(explained_var=explained_variance(v_cat, r_cat), adv_mean=a_cat.mean().item(),
                adv_std=a_cat.std().item() if len(a_cat) > 1 else 0.0,
                return_mean=r_cat.mean().item(), empty_batch=0.0)
    if not train:
        return advs, rets, info
    for r, v in zip(rows, old):
        r.tokens["old_values"] = v.float()
        r.tokens["returns"] = torch.as_tensor(rets[r.sample])[r.resp_pos]
        r.tokens["mask"] = torch.ones(r.num_targets)
    padded = _padded_len(samples)

    def make(step_rows):
        num_tokens = float(sum(float(r.tokens["mask"].sum()) for r in step_rows))
        num_rows = float(sum(_num_copies(r) for r in step_rows))

        def loss_fn(out, b: Batch):
            t = b.tokens
            return value_loss(out[None], t["old_values"][None], t["returns"][None],
                              t["mask"][None], clip=cfg.clip, normalize=cfg.normalize,
                              num_tokens=max(num_tokens, 1.0), num_rows=num_rows,
                              padded_len=padded)
        return loss_fn

    history = train_rows(trainer, rows, make, lm.tokens.pad_id, epochs=cfg.epochs,
                         shuffle=cfg.shuffle, progress=progress)
    trainer.counters["updates"] += 1
    return advs, rets, {**info, **summarize(history)}


# --------------------------------------------------------------------------- SFT


def sft_rows(samples: Sequence[TraceSample], cfg: SFTConfig, lm: DiffusionLM,
             generator: torch.Generator) -> tuple[list[Row], RowStats]:
    """Rows of one SFT batch for ``cfg.method`` (spec 7)."""
    block = _block(lm)
    if cfg.method == "trace":
        return build_trace_rows(samples, block_size=block, mask_id=lm.tokens.mask_id,
                                shrink=cfg.shrink, copies_per_row=cfg.copies_per_row,
                                max_len=cfg.max_len)
    if cfg.method == "semi_ar" and block is None:
        raise ValueError("sft method 'semi_ar' (block SFT) needs a block model; use "
                         "'random_masking' or 'trace' for full-attention models")
    if cfg.method == "random_masking" and block is not None:
        raise ValueError("sft method 'random_masking' is for full-attention models; use "
                         "'semi_ar' (block SFT) or 'trace' for block models")
    if cfg.method not in ("semi_ar", "random_masking"):
        raise ValueError(f"unknown sft method {cfg.method!r}; valid: semi_ar, trace, random_masking")
    return build_masked_rows(samples, block_size=block, mask_id=lm.tokens.mask_id,
                             lower=cfg.lower_p, upper=cfg.upper_p, generator=generator,
                             times=cfg.mask_times, max_len=cfg.max_len)


def sft_train(trainer: Trainer, samples: Sequence[TraceSample], cfg: SFTConfig, steps: int, *,
              progress: bool = False) -> dict[str, float]:
    """``steps`` optimizer steps of SFT, ``micro_batch * grad_accum * world`` examples each,
    cycling through ``samples`` in a fresh random order per pass, fresh masks per step."""
    lm = _lm_of(trainer)
    for i, s in enumerate(samples):
        check_sample(s, i)
    if not samples:
        raise ValueError("SFT needs at least one example")
    c = trainer.cfg
    per_step = c.micro_batch * c.grad_accum * trainer.world_size
    order: list[int] = []
    history, skipped = [], 0
    padded = _padded_len(samples)
    it = range(steps)
    for _ in _progress(it, progress, "sft"):
        while len(order) < per_step:
            order += torch.randperm(len(samples), generator=trainer.generator).tolist()
        take, order = order[:per_step], order[per_step:]
        rows, st = sft_rows([samples[i] for i in take], cfg, lm, trainer.generator)
        skipped += st.skipped_too_long
        if not rows:
            continue
        for r in rows:
            r.tokens["mask"] = torch.ones(r.num_targets)
        num_tokens = float(sum(r.num_targets for r in rows))
        num_rows = float(sum(_num_copies(r) for r in rows))

        def loss_fn(out, b: Batch, num_tokens=num_tokens, num_rows=num_rows):
            logp, entropy = out
            loss, m = sft_loss(logp[None], b.tokens["mask"][None], normalize=cfg.normalize,
                               num_tokens=num_tokens, num_rows=num_rows, padded_len=padded)
            return loss, m

        mbs = split_step(rows, c.grad_accum, trainer.world_size, trainer.rank)
        history.append(trainer.step([collate(mb, lm.tokens.pad_id) for mb in mbs], loss_fn))
    trainer.counters["updates"] += 1
    return {**summarize(history), "rows/skipped_too_long": float(skipped)}
