"""The optimisation loop's state: optimizer, LR schedule, counters and RNG, kept across RL
iterations and restarts.

The reference rebuilds AdamW and restarts its cosine schedule in every RL step (a fresh
process per step; spec 4.8, 12.1.5, 12.2.6). :class:`Trainer` owns one optimizer and one
schedule for the whole run and saves them next to each checkpoint
(:meth:`Trainer.save` / :meth:`Trainer.load`), so iteration ``i+1`` and a restarted run
continue with the same moments, LR and random state.

One optimizer step = ``grad_accum`` micro-batches per process. Losses handed to
:meth:`Trainer.step` are already normalised over the whole step (all micro-batches, all
ranks; :mod:`tracerl.rl.losses`), so gradients are summed, never averaged: on one process
``backward`` accumulates; under DeepSpeed ZeRO (stage 2 or 3, ``zero_stage``) the loss is
multiplied by the world size to undo ZeRO's gradient averaging and passed with
``scale_wrt_gas=False``. A step whose gradients are not finite is skipped (optimizer and
schedule untouched), counted in ``skipped_steps`` and logged.

Devices and precision (:mod:`tracerl.devices`): the trainer works on its module's device;
a batch arrives there from :func:`~tracerl.rl.rows.collate`. Weights in bf16
(``model.dtype``) train against fp32 master copies: gradients move onto them, AdamW's
moments are fp32, and the updated masters are rounded back into the weights; the masters
are saved with the trainer state and restored while they still round to the weights.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from tracerl.devices import HOST, warn_slow_bf16
from tracerl.rl.rows import Batch

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
LossFn = Callable[[Any, Batch], tuple[torch.Tensor, dict[str, float]]]

# how metrics of micro-batches (and ranks) combine
_SUM = {"loss", "policy_loss", "value_loss", "sft_loss", "tokens", "positions"}


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (flat and typed; stage CLIs build it from params.yaml).

    ``schedule``: ``constant`` (after linear warmup) or ``cosine`` from ``lr`` down to
    ``min_lr_ratio * lr`` over ``total_steps`` optimizer steps of the whole run (not of
    one iteration, unlike the reference).
    """

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    total_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0  # 0 = no clipping
    micro_batch: int = 8  # rows per forward
    grad_accum: int = 1  # micro-batches per optimizer step per process
    bf16: bool = False  # bf16 autocast over fp32 weights; DeepSpeed: its bf16 mode
    gradient_checkpointing: bool = False
    zero_stage: int = 0  # 0 = plain torch; 2 or 3 = DeepSpeed ZeRO
    seed: int = 0

    def __post_init__(self):
        p = []
        if self.lr <= 0:
            p.append("lr must be > 0")
        if self.micro_batch < 1 or self.grad_accum < 1:
            p.append("micro_batch and grad_accum must be >= 1")
        if self.zero_stage not in (0, 2, 3):
            p.append(f"zero_stage must be 0 (off), 2 or 3, got {self.zero_stage}")
        if self.schedule == "cosine" and self.total_steps < 1:
            p.append("a cosine schedule needs total_steps >= 1 (optimizer steps of the run)")
        if p:
            raise ValueError("TrainConfig: " + "; ".join(p))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """LR multiplier after ``step`` optimizer steps: linear warmup, then constant or cosine.

    Example:
        >>> c = TrainConfig(warmup_steps=2, schedule="cosine", total_steps=4)
        >>> [round(lr_factor(s, c), 3) for s in range(5)]
        [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def per_rank(cfg: TrainConfig, world: int) -> TrainConfig:
    """``cfg`` for one of ``world`` ranks when ``cfg.grad_accum`` counts the micro-batches
    of a whole optimizer step (params' meaning): each rank runs ``grad_accum / world`` of
    them, so the global batch (``micro_batch * grad_accum`` rows) is the same for any
    number of ranks.

    Example:
        >>> per_rank(TrainConfig(micro_batch=4, grad_accum=4), 2).grad_accum
        2
    """
    if world < 1 or cfg.grad_accum % world:
        raise ValueError(f"grad_accum {cfg.grad_accum} cannot be split across {world} ranks: "
                         f"make grad_accum a multiple of the world size")
    return dataclasses.replace(cfg, grad_accum=cfg.grad_accum // world)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


class Trainer:
    """Optimizer, schedule, counters and RNG around one module.

    Args:
        module: the ``nn.Module`` trained (a :class:`~tracerl.rl.scoring.TokenScorer` or
            :class:`~tracerl.rl.scoring.ValueScorer`).
        cfg: :class:`TrainConfig`.
        kind: a tag saved with the state ("policy", "value", "sft"); :meth:`load` refuses
            a state of another kind.
    """

    def __init__(self, module: nn.Module, cfg: TrainConfig, kind: str = "policy"):
        self.cfg = cfg
        self.kind = kind
        self.counters = {"optimizer_steps": 0, "skipped_steps": 0, "micro_steps": 0,
                         "tokens": 0, "updates": 0}
        # host-side randomness (row order, SFT/baseline masks): rows live on the host
        self.generator = torch.Generator(device=HOST).manual_seed(cfg.seed)
        # called after every optimizer step with (steps so far, the step's metrics): the
        # stages log per-step curves through it (tracerl.tracking.step_logger)
        self.step_hooks: list[Callable[[int, dict[str, float]], None]] = []
        self.module = module
        if cfg.gradient_checkpointing:
            for m in module.modules():
                if hasattr(m, "gradient_checkpointing_enable") and hasattr(m, "config"):
                    m.gradient_checkpointing_enable(
                        gradient_checkpointing_kwargs={"use_reentrant": False})
                    break
        params = [p for p in module.parameters() if p.requires_grad]
        self.device = params[0].device if params else HOST
        if cfg.bf16:
            warn_slow_bf16(f"{kind} bf16 autocast", self.device)
        # weights in a low-precision dtype (model.dtype bfloat16) train against fp32 master
        # copies, so AdamW's moments and its small updates keep fp32 precision
        self.master: list[tuple[nn.Parameter, torch.Tensor]] = []
        if cfg.zero_stage == 0 and any(p.dtype != torch.float32 for p in params):
            self.master = [(p, p.detach().float().clone()) for p in params]
            params = [m for _, m in self.master]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps,
                                           weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg))
        self.engine = None
        if cfg.zero_stage:
            self._init_deepspeed()

    # ------------------------------------------------------------------ distributed
    @property
    def world_size(self) -> int:
        d = _dist()
        return d.get_world_size() if d else 1

    @property
    def rank(self) -> int:
        d = _dist()
        return d.get_rank() if d else 0

    def _init_deepspeed(self) -> None:
        import os

        import deepspeed

        if _dist() is None and "RANK" in os.environ:  # started by a launcher
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        if _dist() is None:
            raise RuntimeError(
                "zero_stage > 0 needs torch.distributed initialised: launch with "
                "`deepspeed`/`torchrun`, or call deepspeed.init_distributed('gloo') on CPU"
            )
        c = self.cfg
        ds_config = {
            "train_micro_batch_size_per_gpu": c.micro_batch,
            "gradient_accumulation_steps": c.grad_accum,
            "train_batch_size": c.micro_batch * c.grad_accum * self.world_size,
            "gradient_clipping": c.max_grad_norm,
            "zero_optimization": {"stage": c.zero_stage},
            "bf16": {"enabled": c.bf16},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.module, optimizer=self.optimizer, lr_scheduler=self.scheduler,
            config=ds_config)

    def barrier(self) -> None:
        """Wait for every rank of the process group (no-op on one process)."""
        d = _dist()
        if d is not None and self.world_size > 1:
            d.barrier()

    def gathered(self):
        """Context in which every rank holds the full parameters: under ZeRO-3 a
        collective gather (every rank must enter it), else nothing to do."""
        import contextlib

        if self.engine is None or self.cfg.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()))

    # ------------------------------------------------------------------ forward
    def _autocast(self):
        on = self.cfg.bf16 and self.engine is None
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on)

    def forward(self, batch: Batch):
        """Run the module on a batch (with grad if in a step, autocast per config).

        The batch should already be on the trainer's device (``collate(..., trainer.device)``
        builds it there); one left on another device is moved here, once.
        """
        fn = self.engine if self.engine is not None else self.module
        batch = batch.to(self.device)
        with self._autocast():
            return fn(**batch.model_inputs())

    @torch.no_grad()
    def score(self, batches: Sequence[Batch]) -> list[Any]:
        """Module outputs of each batch without gradients (old log-probs, old values)."""
        was = self.module.training
        self.module.eval()
        try:
            return [self.forward(b) for b in batches]
        finally:
            self.module.train(was)

    # ------------------------------------------------------------------ step
    def step(self, micro_batches: Sequence[Batch], loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step over this process's micro-batches (``grad_accum`` of them).

        Args:
            micro_batches: this rank's micro-batches of the step.
            loss_fn: ``(module output, batch) -> (loss, metrics)``, the loss normalised over
                the whole step (all micro-batches of all ranks).

        Returns:
            metrics of the step: the loss function's (summed or token-weighted over
            micro-batches and ranks), grad_norm, lr, skipped, seconds.
        """
        if len(micro_batches) != self.cfg.grad_accum:
            raise ValueError(f"expected {self.cfg.grad_accum} micro-batches, got {len(micro_batches)}")
        t0 = time.perf_counter()
        self.module.train()
        parts = []
        skipped_before = self.engine.skipped_steps if self.engine is not None else 0
        # the LR this step applies (DeepSpeed steps its schedule inside engine.step())
        lr = self.scheduler.get_last_lr()[0]
        for mb in micro_batches:
            out = self.forward(mb)
            loss, m = loss_fn(out, mb)
            m = {"loss": loss.item(), **m, "positions": float(mb.num_positions)}
            parts.append(m)
            if self.engine is not None:
                self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
                self.engine.step()
            else:
                loss.backward()
            self.counters["micro_steps"] += self.world_size  # of all ranks: same for any split
        metrics = self._reduce(parts)
        if self.engine is not None:
            gn = self.engine.get_global_grad_norm()
            grad_norm = float(gn) if gn is not None else float("nan")
            skipped = self.engine.skipped_steps > skipped_before
        else:
            self._grads_to_master()
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            skipped = not math.isfinite(grad_norm)
            if not skipped:
                # torch's optimizers keep their step counters on the host by design
                with torch.device(HOST):
                    self.optimizer.step()
                self.scheduler.step()
                self._master_to_weights()
            self.optimizer.zero_grad(set_to_none=True)
        if skipped:
            self.counters["skipped_steps"] += 1
            log.warning("%s step %d skipped: non-finite gradients (grad norm %s)", self.kind,
                        self.counters["optimizer_steps"], grad_norm)
        else:
            self.counters["optimizer_steps"] += 1
        self.counters["tokens"] += int(metrics.get("tokens", 0))
        dt = time.perf_counter() - t0
        metrics.update(grad_norm=grad_norm, lr=lr, skipped=float(skipped), seconds=dt,
                       tokens_per_s=metrics.get("tokens", 0.0) / dt if dt > 0 else 0.0)
        for hook in self.step_hooks:
            hook(self.counters["optimizer_steps"] + self.counters["skipped_steps"], metrics)
        return metrics

    def _grads_to_master(self) -> None:
        """Move the low-precision weights' gradients onto their fp32 master copies."""
        for p, m in self.master:
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def _master_to_weights(self) -> None:
        for p, m in self.master:
            p.copy_(m)

    @torch.no_grad()
    def _load_master(self, saved: list[torch.Tensor]) -> None:
        """Restore saved fp32 master weights when they round to the current weights (the
        checkpoint saved with them); otherwise keep masters taken from the weights."""
        if not self.master:
            return
        if len(saved) == len(self.master) and all(
                s.shape == p.shape and torch.equal(s.to(p.dtype), p.detach().to(HOST))
                for (p, _), s in zip(self.master, saved)):
            for (_, m), s in zip(self.master, saved):
                m.copy_(s)
        else:
            log.info("%s trainer: saved master weights do not match the model; master "
                     "weights restart from the model's %s weights", self.kind,
                     self.master[0][0].dtype)

    def _reduce(self, parts: list[dict[str, float]]) -> dict[str, float]:
        """Combine micro-batch metrics (and ranks): sums for losses and counts, max for
        ``*_max``, token-weighted means for the rest."""
        keys = sorted({k for p in parts for k in p})
        sums, maxes = [], []
        for k in keys:
            if k.endswith("_max"):
                maxes.append(max(p.get(k, -math.inf) for p in parts))
            elif k in _SUM:
                sums.append(sum(p.get(k, 0.0) for p in parts))
            else:
                sums.append(sum(p.get(k, 0.0) * p.get("tokens", 0.0) for p in parts))
        d = _dist()
        if d is not None and self.world_size > 1:
            s = torch.tensor(sums, dtype=torch.float64)
            mx = torch.tensor(maxes or [0.0], dtype=torch.float64)
            d.all_reduce(s)
            d.all_reduce(mx, op=d.ReduceOp.MAX)
            sums, maxes = s.tolist(), mx.tolist()
        out, si, mi = {}, 0, 0
        for k in keys:
            if k.endswith("_max"):
                out[k] = maxes[mi]
                mi += 1
            else:
                out[k] = sums[si]
                si += 1
        tokens = out.get("tokens", 0.0)
        for k in keys:
            if not k.endswith("_max") and k not in _SUM:
                out[k] = out[k] / tokens if tokens else float("nan")
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "config": dataclasses.asdict(self.cfg),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "counters": dict(self.counters),
            # the process-global Python RNG is not saved: no training code draws from it,
            # and its unseeded state would make equal runs' trainer states differ
            "rng": {"generator": self.generator.get_state(), "torch": torch.get_rng_state()},
            # fp32 master weights of low-precision weights (restored when they still match)
            "master": [m.detach().to(HOST) for _, m in self.master],
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write the trainer state (optimizer, schedule, counters, RNG) into ``out_dir``.

        Under DeepSpeed the (partitioned) optimizer state goes through
        ``engine.save_checkpoint`` into ``out_dir/deepspeed``; every rank must call this.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        if self.engine is not None:
            self.engine.save_checkpoint(str(out / "deepspeed"), tag="state",
                                        client_state={"counters": self.counters})
            state.pop("optimizer")
        if self.rank == 0:
            torch.save(state, out / STATE_FILE)
        return out / STATE_FILE

    def load(self, in_dir: str | Path, *, strict_kind: bool = True,
             restore_optimizer: bool = True) -> bool:
        """Restore a state saved by :meth:`save`; returns False when ``in_dir`` has none.

        The LR of the current config wins over the saved one (the schedule position,
        moments and counters are restored). ``restore_optimizer=False`` keeps this
        trainer's fresh optimizer (moments, master weights) and restores the rest: for
        parameters that are new though the run goes on (fresh LoRA adapters of an update
        whose previous adapters were merged into the weights).

        Raises:
            ValueError: the state belongs to another kind of trainer, or does not fit.
        """
        path = Path(in_dir) / STATE_FILE
        if not path.is_file():
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)
        if strict_kind and state.get("kind") != self.kind:
            log.info("not resuming %s trainer from a %s state in %s", self.kind,
                     state.get("kind"), in_dir)
            return False
        ds_dir = Path(in_dir) / "deepspeed"
        if restore_optimizer and (self.engine is not None) != ("optimizer" not in state):
            saved = "DeepSpeed ZeRO" if "optimizer" not in state else "one plain process"
            raise ValueError(
                f"trainer state in {in_dir} was saved by {saved} training; this trainer "
                f"runs {'DeepSpeed ZeRO' if self.engine is not None else 'plain torch'}: "
                f"optimizer states do not carry over between the two (keep zero_stage and "
                f"ranks for the whole run, or start from a checkpoint without its state)")
        try:
            if not restore_optimizer:
                pass
            elif self.engine is not None:
                self.engine.load_checkpoint(str(ds_dir), tag="state",
                                            load_module_strict=False,
                                            load_lr_scheduler_states=False)
            else:
                with torch.device(HOST):
                    self.optimizer.load_state_dict(state["optimizer"])
                self._load_master(state.get("master") or [])
            self.scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise ValueError(f"trainer state in {in_dir} does not fit this model: {e}") from e
        for g in self.optimizer.param_groups:
            g["initial_lr"] = self.cfg.lr
        self.scheduler.base_lrs = [self.cfg.lr for _ in self.optimizer.param_groups]
        self.scheduler.lr_lambdas = [lambda s: lr_factor(s, self.cfg)
                                     for _ in self.optimizer.param_groups]
        for g, lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            g["lr"] = lr * lr_factor(self.scheduler.last_epoch, self.cfg)
        self.counters.update(state["counters"])
        self.generator.set_state(state["rng"]["generator"])
        torch.set_rng_state(state["rng"]["torch"])
        return True
