"""The batching engine every update runs on: rows -> micro-batches -> optimizer steps.

One step loop (:func:`run_steps`) serves the policy, value and SFT updates: an optimizer
step takes ``micro_batch * grad_accum * world_size`` rows, split into ``grad_accum``
micro-batches per process; the loss normalisers (trained tokens, or rows and padded
length) are those of the whole step, so any split gives the same gradient. RL updates
make their steps from a fixed set of rows (:func:`train_rows`: epochs, shuffled); SFT
makes a fresh set of rows per step; both hand their steps to :func:`run_steps`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

import torch

from tracerl.devices import HOST
from tracerl.models import DiffusionLM
from tracerl.rl.rows import Row, TraceSample, collate, records_block_size
from tracerl.rl.scoring import TokenScorer
from tracerl.rl.trainer import Trainer

LossFactory = Callable[[list[Row]], Callable]
"""``step_rows -> loss_fn(out, batch)``: the loss of one step, normalised over ``step_rows``."""


def lm_of(trainer: Trainer) -> DiffusionLM:
    """The diffusion LM inside a trainer's module (policy scorer or value scorer)."""
    m = trainer.module
    return m.lm if isinstance(m, TokenScorer) else m.vm.lm


def update_block_size(lm: DiffusionLM, samples: Sequence[TraceSample]) -> int | None:
    """The block size an RL update of ``lm`` on ``samples`` builds rows with: the one the
    trajectories record (:func:`~tracerl.rl.rows.records_block_size`), never params'."""
    return records_block_size(samples, lm.family.attention, f"model family {lm.family.name!r}")


def num_copies(r: Row) -> int:
    """Reference rows (noisy copies) packed into ``r``."""
    return int(r.round.unique().numel())


def step_normalizers(step_rows: Sequence[Row]) -> tuple[float, float]:
    """``(trained tokens, reference rows)`` of one optimizer step (tokens at least 1)."""
    tokens = float(sum(float(r.tokens["mask"].sum()) for r in step_rows))
    return max(tokens, 1.0), float(sum(num_copies(r) for r in step_rows))


def padded_len(samples: Sequence[TraceSample]) -> int:
    """The reference's ``L1``: the longest response of the update (``normalize='padded'``)."""
    return max((s.response_len for s in samples), default=1)


def _dummy(r: Row) -> Row:
    """A row that runs a forward but trains nothing (keeps ranks in lockstep)."""
    return replace(r, tokens={**r.tokens, "mask": torch.zeros(r.num_targets, device=HOST)})


def split_step(step_rows: Sequence[Row], grad_accum: int, world: int, rank: int) -> list[list[Row]]:
    """This rank's ``grad_accum`` micro-batches of one step (contiguous near-equal parts;
    an empty part is replaced by a zero-weight dummy row)."""
    n = world * grad_accum
    bounds = [round(i * len(step_rows) / n) for i in range(n + 1)]
    parts = [list(step_rows[bounds[i]:bounds[i + 1]]) for i in range(n)]
    mine = parts[rank * grad_accum:(rank + 1) * grad_accum]
    return [p if p else [_dummy(step_rows[0])] for p in mine]


def progress_bar(items, enabled: bool, desc: str, total: int | None = None):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, leave=False, total=total)


def score_rows(trainer: Trainer, rows: Sequence[Row], pad_id: int, micro_batch: int,
               progress: bool = False) -> list:
    """No-grad module outputs per row: a tensor ``[M_r]`` (or a tuple of them) per row, on the
    host (rows live there; one copy per scored micro-batch).

    Across ranks each scores its share of the micro-batches (``i % world == rank``), the
    same micro-batches one process would score (so the same numbers), and every rank
    receives all results. Ranks stay in lockstep (a rank without a micro-batch in a round
    scores a spare one and drops it), since a ZeRO-3 forward is a collective.
    """
    chunks = [rows[i:i + micro_batch] for i in range(0, len(rows), micro_batch)]
    world, rank = trainer.world_size, trainer.rank

    def run(chunk) -> list:
        res = trainer.score([collate(chunk, pad_id, trainer.device)])[0]
        sizes = [r.num_targets for r in chunk]
        if isinstance(res, tuple):
            split = [t.to(HOST).split(sizes) for t in res]
            return [tuple(s[i] for s in split) for i in range(len(chunk))]
        return list(res.to(HOST).split(sizes))

    if world == 1:
        return [o for chunk in progress_bar(chunks, progress, "score") for o in run(chunk)]
    import torch.distributed as dist

    mine = {}
    for k in progress_bar(range(0, len(chunks), world), progress, "score"):
        i = k + rank
        out = run(chunks[i] if i < len(chunks) else chunks[0])
        if i < len(chunks):
            mine[i] = out
    every: list = [None] * world
    dist.all_gather_object(every, mine)
    merged = {i: out for part in every for i, out in part.items()}
    return [o for i in range(len(chunks)) for o in merged[i]]


def run_steps(trainer: Trainer, steps: Iterable[list[Row]], make_loss: LossFactory, pad_id: int,
              *, progress: bool = False, total: int | None = None) -> list[dict[str, float]]:
    """The step loop: one optimizer step per item of ``steps`` (the step's rows on every
    rank); returns per-step metrics. ``make_loss(step_rows)`` gives the step's loss."""
    c = trainer.cfg
    history = []
    for step_rows in progress_bar(steps, progress, trainer.kind, total):
        loss_fn = make_loss(step_rows)
        mbs = split_step(step_rows, c.grad_accum, trainer.world_size, trainer.rank)
        history.append(trainer.step([collate(mb, pad_id, trainer.device) for mb in mbs], loss_fn))
    return history


def rows_per_step(trainer: Trainer) -> int:
    c = trainer.cfg
    return c.micro_batch * c.grad_accum * trainer.world_size


def train_rows(trainer: Trainer, rows: list[Row], make_loss: LossFactory, pad_id: int, *,
               epochs: int = 1, shuffle: bool = True, progress: bool = False
               ) -> list[dict[str, float]]:
    """Optimizer steps over a fixed set of ``rows`` for ``epochs`` passes (RL updates)."""
    per_step = rows_per_step(trainer)

    def steps():
        for _ in range(epochs):
            order = (torch.randperm(len(rows), generator=trainer.generator,
                                    device=trainer.generator.device).tolist() if shuffle
                     else list(range(len(rows))))
            for s in range(0, len(order), per_step):
                yield [rows[i] for i in order[s:s + per_step]]

    return run_steps(trainer, steps(), make_loss, pad_id, progress=progress,
                     total=epochs * math.ceil(len(rows) / per_step))


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
