"""The policy update: trajectories -> rows with advantages and old log-probs -> TraceRL steps.

TraceRL (Wang et al. 2025, arXiv 2509.06949, section 3.2; reference spec 4.4-4.8 and
6.6): every response token is trained in the block state it was unmasked from, with the
clipped ratio objective and an optional KL term (:func:`tracerl.rl.losses.trace_rl_loss`).
Rows are built at the block size the trajectories were decoded with (their records),
never at one from params: :func:`~tracerl.rl.rows.records_block_size`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import replace

import torch

from tracerl.devices import HOST
from tracerl.models import DiffusionLM, weights_digest
from tracerl.models.lora import adapters_disabled
from tracerl.rl.builders import ROW_BUILDERS
from tracerl.rl.configs import PolicyConfig
from tracerl.rl.engine import (
    lm_of,
    padded_len,
    score_rows,
    step_normalizers,
    summarize,
    train_rows,
    update_block_size,
)
from tracerl.rl.losses import trace_rl_loss
from tracerl.rl.rows import Batch, Row, TraceSample, build_trace_rows, collate
from tracerl.rl.scoring import TokenScorer
from tracerl.rl.trainer import Trainer

log = logging.getLogger(__name__)


def trajectory_logprobs(lm: DiffusionLM, samples: Sequence[TraceSample], *, shrink: int = 1,
                        copies_per_row: int = 0, micro_batch: int = 8) -> list[torch.Tensor]:
    """The trainer's log-prob of every response token, ``[response_len]`` per sample.

    With ``shrink = 1`` and the sampling weights these equal the sampler's recorded
    log-probs (fp32): each token is scored in the block state it was unmasked from, at the
    block size recorded with the trajectory.
    """
    rows, _ = build_trace_rows(samples, block_size=update_block_size(lm, samples),
                               mask_id=lm.tokens.mask_id, shrink=shrink,
                               copies_per_row=copies_per_row)
    scorer = TokenScorer(lm)
    was = lm.training
    lm.eval()
    out = [torch.full((s.response_len,), float("nan"), device=HOST) for s in samples]
    with torch.no_grad():
        for i in range(0, len(rows), micro_batch):
            b = collate(rows[i:i + micro_batch], lm.tokens.pad_id, lm.device)
            logp, _ = scorer(**b.model_inputs())
            for s, j, v in zip(b.sample.tolist(), b.resp_pos.tolist(), logp.tolist()):
                out[s][j] = v
    lm.train(was)
    return out


def _recorded_usable(trainer: Trainer, lm: DiffusionLM, samples: Sequence[TraceSample],
                     cfg: PolicyConfig) -> bool:
    """Whether the rollout's log-probs are exactly the old log-probs: TraceRL rounds with
    ``shrink = 1`` at the decoding block, fp32 unpartitioned training, and every sample
    sampled by these weights."""
    ok = (cfg.use_recorded_logprobs and cfg.method == "trace_rl" and cfg.shrink == 1
          and not trainer.cfg.bf16 and lm.dtype == torch.float32
          and trainer.cfg.zero_stage != 3  # (partitioned weights)
          # a larger training block changes the contexts: the sampler's scores don't apply
          and all(s.train_block == s.block_size for s in samples)
          and all(s.exact_logprobs for s in samples)  # no approximate sampler cache
          and all(s.logprobs is not None and s.policy_id for s in samples))
    if ok:
        digest = weights_digest(lm)
        ok = all(s.policy_id == digest for s in samples)
    return ok


def prepare_policy_rows(trainer: Trainer, samples: Sequence[TraceSample], cfg: PolicyConfig, *,
                        ref_model: DiffusionLM | None = None, ref_adapters_off: bool = False,
                        progress: bool = False) -> tuple[list[Row], dict[str, float]]:
    """Rows with ``advantages``, ``old_logprobs``, ``mask`` (and ``ref_logprobs``) attached.

    The KL reference (``beta > 0``, ``kl_target: reference``) is ``ref_model``, or, with
    ``ref_adapters_off``, the trained model itself with its LoRA adapters switched off
    (its base weights are the reference: no second copy).

    Old log-probs come from the rollout record when :func:`_recorded_usable` (then they
    are exactly the states the sampler scored, saving a forward pass); otherwise they are
    recomputed, and ``old_logprob_drift_max`` reports the largest gap to the recorded ones
    (the policy's change since sampling, plus any rollout/trainer mismatch).
    """
    lm = lm_of(trainer)
    block = update_block_size(lm, samples)
    rows, stats = ROW_BUILDERS.get(cfg.method)(samples, block, lm.tokens.mask_id, cfg,
                                               trainer.generator)
    info = stats.as_metrics()
    if stats.skipped_too_long:
        log.warning("skipped %d trajectories longer than max_len=%d", stats.skipped_too_long,
                    cfg.max_len)
    if not rows:
        return rows, info
    recorded = _recorded_usable(trainer, lm, samples, cfg)
    if recorded:
        for r in rows:
            lp = torch.as_tensor(list(samples[r.sample].logprobs), dtype=torch.float32,
                                 device=HOST)
            r.tokens["old_logprobs"] = lp[r.resp_pos]
    else:
        drift = []
        for r, (lp, _) in zip(rows, score_rows(trainer, rows, lm.tokens.pad_id,
                                               trainer.cfg.micro_batch, progress)):
            r.tokens["old_logprobs"] = lp.float()
            rec = samples[r.sample].logprobs
            if rec is not None:
                rec = torch.as_tensor(list(rec), dtype=torch.float32, device=HOST)[r.resp_pos]
                drift.append(float((lp.float() - rec).abs().max()) if len(rec) else 0.0)
        if drift:
            info["old_logprob_drift_max"] = max(drift)
    info["old_logprobs_recorded"] = float(recorded)
    if cfg.beta > 0 and cfg.kl_target == "reference":
        if ref_adapters_off:  # the policy's own base weights
            scorer, ctx = trainer, adapters_disabled(lm)
        elif ref_model is not None:
            scorer = Trainer(TokenScorer(ref_model), replace(trainer.cfg, zero_stage=0),
                             kind="ref")
            ctx = nullcontext()
        else:
            raise ValueError("policy kl_target='reference' with beta > 0 needs a reference model")
        with ctx:
            for r, (lp, _) in zip(rows, score_rows(scorer, rows, lm.tokens.pad_id,
                                                   trainer.cfg.micro_batch, progress)):
                r.tokens["ref_logprobs"] = lp.float()
    for r in rows:
        s = samples[r.sample]
        if s.token_advantages is not None:
            adv = torch.as_tensor(list(s.token_advantages), dtype=torch.float32,
                                  device=HOST)[r.resp_pos]
        else:
            adv = torch.full((r.num_targets,), float(s.advantage), device=HOST)
        r.tokens["advantages"] = adv
        r.tokens["mask"] = torch.ones(r.num_targets, device=HOST)
    return rows, info


def policy_loss_factory(cfg: PolicyConfig, padded: int) -> Callable[[list[Row]], Callable]:
    """``step_rows -> loss_fn`` for :func:`~tracerl.rl.engine.run_steps` (normalisers of the
    whole step)."""

    def make(step_rows: list[Row]):
        num_tokens, num_rows = step_normalizers(step_rows)

        def loss_fn(out, b: Batch):
            logp, entropy = out
            t = b.tokens
            loss, m = trace_rl_loss(
                logp[None], t["old_logprobs"][None], t["advantages"][None], t["mask"][None],
                eps=cfg.eps, beta=cfg.beta, kl_estimator=cfg.kl_estimator,
                ref_logprobs=t["ref_logprobs"][None] if "ref_logprobs" in t else None,
                normalize=cfg.normalize, num_tokens=num_tokens, num_rows=num_rows,
                padded_len=padded)
            n = t["mask"].sum().clamp(min=1)
            m["entropy"] = float((entropy * t["mask"]).sum() / n)
            return loss, m

        return loss_fn

    return make


def policy_update(trainer: Trainer, samples: Sequence[TraceSample], cfg: PolicyConfig, *,
                  ref_model: DiffusionLM | None = None, ref_adapters_off: bool = False,
                  progress: bool = False) -> dict[str, float]:
    """One TraceRL (or baseline) policy update over an iteration's samples.

    An empty batch (every group filtered) makes no step and says so in the metrics
    (``empty_batch = 1``) instead of crashing (reference issue #20).

    Returns:
        metrics: loss, policy_loss, kl, clip_fraction, ratio_mean, ratio_max, entropy,
        grad_norm, lr, tokens, tokens_per_s, steps, skipped, row counts and
        ``rows/block_size`` (the records' block size the rows were built with).
    """
    rows, info = prepare_policy_rows(trainer, samples, cfg, ref_model=ref_model,
                                     ref_adapters_off=ref_adapters_off, progress=progress)
    if not rows:
        log.warning("policy update skipped: no trainable rows (%d samples)", len(samples))
        return {**info, "empty_batch": 1.0, "steps": 0.0}
    history = train_rows(trainer, rows, policy_loss_factory(cfg, padded_len(samples)),
                         lm_of(trainer).tokens.pad_id, epochs=cfg.epochs, shuffle=cfg.shuffle,
                         progress=progress)
    trainer.counters["updates"] += 1
    return {**info, **summarize(history), "empty_batch": 0.0}


@torch.no_grad()
def evaluate_policy_loss(trainer: Trainer, rows: list[Row], cfg: PolicyConfig,
                         padded: int) -> float:
    """The policy loss of ``rows`` taken as ONE step, without updating (tests, diagnostics)."""
    loss_fn = policy_loss_factory(cfg, padded)(rows)
    total = 0.0
    pad = lm_of(trainer).tokens.pad_id
    for i in range(0, len(rows), trainer.cfg.micro_batch):
        b = collate(rows[i:i + trainer.cfg.micro_batch], pad, trainer.device)
        total += loss_fn(trainer.score([b])[0], b)[0].item()
    return total
