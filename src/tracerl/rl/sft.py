"""Supervised fine-tuning of a diffusion LM (reference spec 7): block SFT, trace SFT and
full-attention random-masking SFT, on the same step loop as the RL updates
(:func:`~tracerl.rl.engine.run_steps`), with fresh masks every step.

SFT data is not a rollout: it has no decoding record, so its rows use the model's own
block size (the block size the model is being taught to decode with).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tracerl.devices import HOST
from tracerl.models import DiffusionLM
from tracerl.rl.builders import SFT_ROW_BUILDERS
from tracerl.rl.configs import SFTConfig
from tracerl.rl.engine import (
    lm_of,
    padded_len,
    rows_per_step,
    run_steps,
    step_normalizers,
    summarize,
)
from tracerl.rl.losses import sft_loss
from tracerl.rl.rows import Batch, Row, RowStats, TraceSample, check_sample
from tracerl.rl.trainer import Trainer


def sft_rows(samples: Sequence[TraceSample], cfg: SFTConfig, lm: DiffusionLM,
             generator: torch.Generator) -> tuple[list[Row], RowStats]:
    """Rows of one SFT batch for ``cfg.method`` (a name of ``SFT_ROW_BUILDERS``, spec 7)."""
    block = lm.block_size if lm.family.attention == "block" else None
    return SFT_ROW_BUILDERS.get(cfg.method)(samples, block, lm.tokens.mask_id, cfg, generator)


@dataclass
class SFTProgress:
    """Where an SFT run stands: with the model weights and the trainer state (optimizer,
    schedule, counters, RNG), all a mid-run checkpoint needs to resume bit-identically.

    Args:
        done: steps of the run consumed (an optimizer step each, unless every example of
            the step was skipped).
        order: example indices of the current pass not yet used (the data order).
        skipped: examples skipped so far as too long.
        history: per-step metrics so far (the summary covers the whole run).
        validation: ``[step, accuracy]`` of each validation so far.
        stopped: the validation accuracy reached the stop threshold: no more steps.
    """

    done: int = 0
    order: list[int] = field(default_factory=list)
    skipped: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    validation: list[list[float]] = field(default_factory=list)
    stopped: bool = False


def sft_train(trainer: Trainer, samples: Sequence[TraceSample], cfg: SFTConfig, steps: int, *,
              progress: bool = False, resume: SFTProgress | None = None,
              checkpoint_every: int = 0,
              on_checkpoint: Callable[[SFTProgress], None] | None = None,
              validate: Callable[[int], float] | None = None, validate_every: int = 0,
              stop_at: float = 0.0) -> dict[str, float]:
    """``steps`` optimizer steps of SFT, ``micro_batch * grad_accum * world`` examples each,
    cycling through ``samples`` in a fresh random order per pass, fresh masks per step.

    Every ``validate_every`` steps (0: never) ``validate()`` gives an accuracy (recorded in
    ``SFTProgress.validation``); once it reaches ``stop_at`` (> 0) the run stops there,
    before ``steps``: SFT of small models is a phase change whose step varies by seed, and
    stopping on a validation threshold gives comparable starting points for RL.

    Every ``checkpoint_every`` steps (0: never) ``on_checkpoint`` receives the progress, to
    save with the model and trainer state; ``resume`` continues from such a checkpoint
    (with the model and trainer restored) and gives the same result as a run that was
    never interrupted (tested)."""
    lm = lm_of(trainer)
    for i, s in enumerate(samples):
        check_sample(s, i)
    if not samples:
        raise ValueError("SFT needs at least one example")
    per_step = rows_per_step(trainer)
    state = resume or SFTProgress()

    def step_rows():
        for _ in range(steps - state.done):
            if state.stopped:
                return
            while len(state.order) < per_step:
                state.order += torch.randperm(len(samples), generator=trainer.generator,
                                              device=trainer.generator.device).tolist()
            take, state.order = state.order[:per_step], state.order[per_step:]
            rows, st = sft_rows([samples[i] for i in take], cfg, lm, trainer.generator)
            state.skipped += st.skipped_too_long
            state.done += 1
            for r in rows:
                r.tokens["mask"] = torch.ones(r.num_targets, device=HOST)
            if rows:
                yield rows

    def after_step(_: int, metrics: dict[str, float]) -> None:
        state.history.append(metrics)
        if validate is not None and validate_every > 0 and state.done % validate_every == 0:
            acc = float(validate(state.done))
            state.validation.append([float(state.done), acc])
            # a stop only when steps remain: reaching it at the last step is a full run
            state.stopped = stop_at > 0 and acc >= stop_at and state.done < steps
        if (on_checkpoint is not None and checkpoint_every > 0
                and state.done % checkpoint_every == 0 and state.done < steps):
            on_checkpoint(state)

    padded = padded_len(samples)

    def make(rows: list[Row]):
        num_tokens, num_rows = step_normalizers(rows)

        def loss_fn(out, b: Batch):
            logp, _ = out
            return sft_loss(logp[None], b.tokens["mask"][None], normalize=cfg.normalize,
                            num_tokens=num_tokens, num_rows=num_rows, padded_len=padded)

        return loss_fn

    trainer.step_hooks.append(after_step)
    try:
        run_steps(trainer, step_rows(), make, lm.tokens.pad_id, progress=progress,
                  total=steps - state.done)
    finally:
        trainer.step_hooks.remove(after_step)
    trainer.counters["updates"] += 1
    out = {**summarize(state.history), "rows/skipped_too_long": float(state.skipped)}
    if state.validation:
        out.update(val_accuracy=state.validation[-1][1], val_step=state.validation[-1][0],
                   stopped_early=float(state.stopped))
    return out


class SFTCheckpoints:
    """Mid-run checkpoints of an SFT stage, in a folder beside its output.

    Each checkpoint is ``step_<n>/`` (module weights, trainer state, progress); the file
    ``latest.json`` (replaced atomically) names the newest complete one and the
    ``fingerprint`` of what the run depends on (params, data). A checkpoint whose
    fingerprint differs belongs to another run and is ignored.
    """

    def __init__(self, folder, fingerprint: str):
        from pathlib import Path

        self.folder, self.fingerprint = Path(folder), fingerprint

    def save(self, trainer: Trainer, progress: SFTProgress) -> None:
        """Write a checkpoint. Under DeepSpeed every rank calls this (each saves its
        partition of the optimizer); rank 0 writes the rest, ``latest.json`` last."""
        import json
        import os
        import shutil

        main = trainer.rank == 0
        step = self.folder / f"step_{progress.done}"
        if main:
            shutil.rmtree(step, ignore_errors=True)
            step.mkdir(parents=True)
        trainer.barrier()
        with trainer.gathered():  # ZeRO-3: the full weights (collective)
            if main:
                torch.save(trainer.module.state_dict(), step / "module.pt")
        trainer.save(step / "trainer_state")
        trainer.barrier()  # every rank's part is on disk before latest.json names it
        if not main:
            return
        (step / "progress.json").write_text(json.dumps(progress.__dict__))
        tmp = self.folder / ".latest.json.tmp"
        tmp.write_text(json.dumps({"step": progress.done, "fingerprint": self.fingerprint}))
        os.replace(tmp, self.folder / "latest.json")
        for old in self.folder.glob("step_*"):
            if old != step:
                shutil.rmtree(old, ignore_errors=True)

    def restore(self, trainer: Trainer) -> SFTProgress | None:
        """Load the newest checkpoint into ``trainer`` (module and state); None if none."""
        import json

        latest = self.folder / "latest.json"
        try:
            rec = json.loads(latest.read_text())
        except (OSError, ValueError):
            return None
        step = self.folder / f"step_{rec.get('step')}"
        if rec.get("fingerprint") != self.fingerprint or not (step / "progress.json").is_file():
            return None
        if trainer.engine is None:  # DeepSpeed restores the module with its own state
            trainer.module.load_state_dict(torch.load(step / "module.pt", map_location="cpu"))
        trainer.load(step / "trainer_state")
        return SFTProgress(**json.loads((step / "progress.json").read_text()))

    def clear(self, trainer: Trainer | None = None) -> None:
        """Remove the checkpoints (rank 0 of ``trainer``'s group only)."""
        import shutil

        if trainer is None or trainer.rank == 0:
            shutil.rmtree(self.folder, ignore_errors=True)
