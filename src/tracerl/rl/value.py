"""The value update: GAE over decode steps with the pre-update values, then the clipped
value regression (TraceRL's value model, Wang et al. 2025, section 3.3; reference spec
6.3-6.5). Rows are the TraceRL rows of the policy update, built at the block size the
trajectories were decoded with (:func:`~tracerl.rl.rows.records_block_size`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from tracerl.devices import HOST
from tracerl.rl.advantages import outcome_token_rewards, step_gae
from tracerl.rl.configs import ValueConfig
from tracerl.rl.engine import (
    lm_of,
    padded_len,
    score_rows,
    step_normalizers,
    summarize,
    train_rows,
    update_block_size,
)
from tracerl.rl.losses import explained_variance, value_loss
from tracerl.rl.rows import Batch, TraceSample, build_trace_rows, response_blocks, shrink_steps
from tracerl.rl.trainer import Trainer

log = logging.getLogger(__name__)


def _gae_steps(s: TraceSample, block_size: int | None, shrink: int) -> torch.Tensor:
    """The (shrunk) decode step of each trained token ``[response_len]``: GAE's time steps."""
    R = len(s.response_ids)
    steps = (torch.as_tensor(list(s.decode_steps), device=HOST) if s.decode_steps is not None
             else torch.arange(1, R + 1, device=HOST))
    return shrink_steps(steps, response_blocks(len(s.prompt_ids), R, block_size),
                        shrink)[: s.response_len]


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
        explained_var (old values vs returns), value_clip_fraction, adv_mean, adv_std,
        ``rows/block_size``, ...
    """
    lm = lm_of(trainer)
    block = update_block_size(lm, samples)
    rows, stats = build_trace_rows(samples, block_size=block, mask_id=lm.tokens.mask_id,
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
    kept = sorted({r.sample for r in rows})
    values = {i: torch.full((samples[i].response_len,), float("nan"), device=HOST) for i in kept}
    for r, v in zip(rows, old):
        values[r.sample][r.resp_pos] = v.float()
    for i in kept:
        if torch.isnan(values[i]).any():
            raise AssertionError(f"sample {i}: a trainable token was not valued exactly once")
    # one padded batch [K, L] of the kept samples -> batched GAE
    steps = pad_sequence([_gae_steps(samples[i], block, cfg.shrink) for i in kept], batch_first=True)
    V = pad_sequence([values[i] for i in kept], batch_first=True)
    mask = pad_sequence([torch.ones(samples[i].response_len, dtype=torch.bool, device=HOST)
                         for i in kept],
                        batch_first=True)
    outcome = outcome_token_rewards(torch.tensor([float(samples[i].advantage) for i in kept],
                                                 device=HOST),
                                    steps, mask)
    process = [samples[i].token_rewards for i in kept]
    if any(p is not None for p in process):
        tok = pad_sequence([torch.as_tensor(list(p), dtype=torch.float32, device=HOST)
                            if p is not None else torch.zeros(samples[i].response_len, device=HOST)
                            for i, p in zip(kept, process)], batch_first=True)
        has = torch.tensor([p is not None for p in process], device=HOST)[:, None]
        rewards = torch.where(has, tok, outcome)
    else:
        rewards = outcome
    ret, adv = step_gae(rewards, V, steps, mask, gamma=cfg.gamma, lam=cfg.lam)
    for k, i in enumerate(kept):
        L = samples[i].response_len
        advs[i], rets[i] = adv[k, :L].tolist(), ret[k, :L].tolist()
    v_cat, r_cat, a_cat = V[mask], ret[mask], adv[mask]
    info.update(explained_var=explained_variance(v_cat, r_cat), adv_mean=a_cat.mean().item(),
                adv_std=a_cat.std().item() if len(a_cat) > 1 else 0.0,
                return_mean=r_cat.mean().item(), empty_batch=0.0)
    if not train:
        return advs, rets, info
    for r, v in zip(rows, old):
        r.tokens["old_values"] = v.float()
        r.tokens["returns"] = torch.as_tensor(rets[r.sample], device=HOST)[r.resp_pos]
        r.tokens["mask"] = torch.ones(r.num_targets, device=HOST)
    padded = padded_len(samples)

    def make(step_rows):
        num_tokens, num_rows = step_normalizers(step_rows)

        def loss_fn(out, b: Batch):
            t = b.tokens
            return value_loss(out[None], t["old_values"][None], t["returns"][None],
                              t["mask"][None], clip=cfg.clip, normalize=cfg.normalize,
                              num_tokens=num_tokens, num_rows=num_rows, padded_len=padded)
        return loss_fn

    history = train_rows(trainer, rows, make, lm.tokens.pad_id, epochs=cfg.epochs,
                         shuffle=cfg.shuffle, progress=progress)
    trainer.counters["updates"] += 1
    return advs, rets, {**info, **summarize(history)}
