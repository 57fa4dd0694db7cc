"""The stage registry: the one place a pipeline stage is declared.

Everything else about a stage derives from its :class:`StageSpec`:

- its **cache key** (:func:`tracerl.pipeline.layout.stage_key`) digests exactly the
  ``params.yaml`` sections (or ``section.key`` entries) in ``reads``;
- a stage that reads a section it did not declare fails (the guarded params of
  :func:`tracerl.pipeline.stage_cli.load_stage_params`), and the sections it did read are
  recorded in its manifest (``params_read``), so a declaration cannot drift from the code;
- the **planner** checks every input it wires against ``inputs``;
- the **runners** take the module, the image and the GPU request from here;
- the **orchestrator** logs ``reads`` to the stage's MLflow child run and ``checkpoints``
  as artifacts;
- **dvc.yaml** is generated from :data:`STAGES` and :data:`DVC_PARTS`
  (``python -m tracerl.pipeline.dvcgen --write``; a test fails when it is stale).

How to add a stage: write ``stages/<name>.py`` against the stage CLI contract
(:mod:`tracerl.pipeline.stage_cli`), declare it below with ``declare(StageSpec(...))``,
wire its inputs in :class:`tracerl.pipeline.layout.Planner` (the one place the data flow
between stages is written), put it in a part of :data:`DVC_PARTS`, and regenerate dvc.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tracerl.config import GRADING_PARAMS
from tracerl.registry import Registry


@dataclass(frozen=True)
class Resources:
    """Where a stage may run.

    Args:
        image: image kind of ``containers/`` (``tracerl-<image>:<tag>``).
        gpu: the stage computes on ``run.device`` and asks a container engine for GPUs
            when that device is CUDA; False: a CPU-only stage.
        ranks: the params key (``"policy.ranks"``) that sets this stage's processes per
            node: a stage that names one may run multi-rank (the runners launch it
            through torchrun when the key's value is above 1, :mod:`tracerl.pipeline.launch`);
            empty: always one process. Ranks stay in the stage's cache key: a 2-rank
            update equals the 1-rank one to 1e-5, not bit for bit.
        shards: independent pieces a stage run may be split into (sharded rollout): a
            number, or the params key that holds it (``"rollout.shards"``).
        shard_retries: retries of a failed shard: a number, or the params key.

    A shards key named here says where and how a stage runs, never what it writes (the
    merged shards equal the unsharded output): :func:`placement_keys` leaves it out of
    every cache key and of DVC's params.
    """

    image: str = "cpu"
    gpu: bool = False
    ranks: str = ""
    shards: int | str = 1
    shard_retries: int | str = 0


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage.

    Args:
        name: the stage's name (``stages/<name>.py``, the folder ``.../<name>/``).
        doc: one line: what it does.
        reads: params sections (``"rollout"``) or single keys (``"run.seed"``) it reads.
        checks: single keys it reads only to refuse bad input before any work (they may
            make it fail, never change what it writes): allowed by the guard, recorded as
            ``params_checked``, left out of its key and of DVC's params.
        inputs: names of its ``--input NAME=DIR`` artifact folders.
        outputs: files it writes into ``--out`` (glob patterns; ``*`` for many).
        metrics: keys of its ``metrics.json`` that curves, plots and docs rely on.
        checkpoints: folders of its output logged to MLflow as model artifacts.
        loop: ``iteration`` for stages run once per RL iteration, else ``once``.
        resources: where it may run.
    """

    name: str
    doc: str
    reads: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    metrics: tuple[str, ...] = ()
    checks: tuple[str, ...] = ()
    checkpoints: tuple[str, ...] = ()
    loop: str = "once"
    resources: Resources = field(default_factory=Resources)

    @property
    def module(self) -> str:
        """The stage CLI module (``stages.<name>``)."""
        return stage_module(self.name)

    def sections(self) -> tuple[str, ...]:
        """The params sections it reads, whole or in part (``run.seed`` -> ``run``)."""
        return tuple(dict.fromkeys(r.split(".")[0] for r in self.reads))


def stage_module(stage: str, package: str = "stages") -> str:
    """The module that holds stage ``stage`` (tests point ``package`` at fakes)."""
    return f"{package}.{stage}"


TRAIN = Resources(image="train-gpu", gpu=True)
ROLLOUT = Resources(image="rollout-gpu", gpu=True)
SHARDED_ROLLOUT = Resources(image="rollout-gpu", gpu=True, shards="rollout.shards",
                            shard_retries="rollout.shard_retries")


def train(section: str) -> Resources:
    """A training stage's resources: the train image, GPUs, ranks from ``<section>.ranks``."""
    return Resources(image=TRAIN.image, gpu=TRAIN.gpu, ranks=f"{section}.ranks")


STAGES: Registry[StageSpec] = Registry("stage")


def declare(spec: StageSpec) -> StageSpec:
    """Add ``spec`` to :data:`STAGES` under its name (a second declaration fails)."""
    return STAGES.add(spec.name, spec)


declare(StageSpec(
    "prepare", "train / held-out task sets and the SFT corpus",
    reads=("data", "run.seed"),
    # do the prompts fit the model's context with the run's budgets? (counted, not dropped)
    checks=("model.init", "model.max_position_embeddings", "model.block_size",
            "rollout.max_tokens", "curriculum.block_size_schedule",
            "curriculum.max_tokens_schedule", "curriculum.max_tokens_by_level",
            "evaluate.block_sizes", "evaluate.max_tokens"),
    inputs=(),
    outputs=("train.parquet", "heldout.parquet", "sft.parquet", "skipped.jsonl"),
    metrics=("train_tasks", "heldout_tasks", "sft_examples"),
))
declare(StageSpec(
    "sft", "supervised fine-tuning of the initial policy",
    # rollout.max_tokens: the canvas full-attention SFT fills; the grading params: validation
    reads=("model", "sft", "rollout.max_tokens", *(f"reward.{k}" for k in GRADING_PARAMS),
           "run.seed", "run.device"),
    inputs=("data",),
    outputs=("checkpoint/*", "trainer_state/*"),
    metrics=("loss", "nll", "lr", "grad_norm", "tokens_per_s"),
    checkpoints=("checkpoint",),
    resources=train("sft"),
))
declare(StageSpec(
    "rollout", "k responses per task with their decoding trajectories",
    reads=("model", "rollout", "curriculum", "data", "run.seed", "run.device", "run.threads"),
    # shard: the shards' folders to merge (the flow's sharded rollout)
    inputs=("data", "policy", "curriculum", "shard"),
    outputs=("rollouts.parquet",),
    metrics=("response_length", "tokens_per_s", "forward_per_token", "block_size",
             "max_tokens", "level"),
    loop="iteration",
    resources=SHARDED_ROLLOUT,
))
declare(StageSpec(
    "reward", "verification, group filter and advantages",
    # model.init: the tokenizer of a process-reward judge; run.device, model.dtype: where
    # and in which dtype the judge runs
    reads=("reward", "model.init", "model.dtype", "run.device"),
    inputs=("data", "rollout"),
    outputs=("scored.parquet", "trajectory.html"),
    metrics=("accuracy", "mean_reward", "kept_responses"),
    loop="iteration",
))
declare(StageSpec(
    "value", "value-model regression and token advantages (policy.use_value)",
    reads=("model", "value", "run.device"),
    inputs=("scored", "policy", "value"),
    outputs=("checkpoint/*", "trainer_state/*", "advantages.parquet"),
    metrics=("value_loss", "value_mean", "explained_var", "grad_norm", "lr"),
    checkpoints=("checkpoint",),
    loop="iteration",
    resources=train("value"),
))
declare(StageSpec(
    "policy", "one TraceRL update of the policy",
    reads=("model", "policy", "run.device"),
    inputs=("scored", "policy", "reference", "value"),
    outputs=("checkpoint/*", "trainer_state/*"),
    metrics=("loss", "kl", "clip_fraction", "ratio_max", "entropy", "grad_norm", "lr"),
    checkpoints=("checkpoint",),
    loop="iteration",
    resources=train("policy"),
))
declare(StageSpec(
    "curriculum", "pool and schedule (difficulty, block size, token budget) of the next iteration",
    reads=("curriculum", "data", "model", "rollout"),
    inputs=("data", "scored", "curriculum"),
    outputs=("decision.json",),
    metrics=("pass_rate", "level", "block_size", "max_tokens"),
    loop="iteration",
))
declare(StageSpec(
    "evaluate", "held-out benchmarks, static and dynamic decoding",
    reads=("evaluate", "model", "rollout", "reward", "curriculum", "data", "run.seed",
           "run.device"),
    inputs=("data", "policy", "curriculum"),
    outputs=("eval.json", "samples_*.parquet"),
    metrics=("accuracy",),
    resources=ROLLOUT,
))

ITERATION_STAGES = tuple(n for n, s in STAGES.items() if s.loop == "iteration")


@dataclass(frozen=True)
class DvcPart:
    """A coarse DVC stage: a part of the pipeline that ``flows.tracerl_flow --stage``
    runs, made of registry stages.

    Args:
        stages: the registry stages it runs (their reads become its ``params``).
        upstream: parts whose output folders it depends on.
        flow_reads: params keys the flow itself reads to plan this part.
        prefect: run it as a Prefect flow (else ``--no-prefect``).
        persist: keep its output between runs (DVC ``persist``): resumable loops.
        orchestration: the flow's own code is a dependency (it decides what runs).
        headline: it writes ``metrics/headline.json``, the run's result in a few numbers:
            the one DVC metrics file (every part's full ``metrics/<part>.json`` is a plain
            output, so ``dvc metrics show`` / ``dvc exp show`` stay a few columns wide).
    """

    stages: tuple[str, ...]
    upstream: tuple[str, ...] = ()
    flow_reads: tuple[str, ...] = ()
    prefect: bool = False
    persist: bool = False
    orchestration: bool = False
    headline: bool = False


DVC_PARTS: dict[str, DvcPart] = {
    "prepare": DvcPart(("prepare",)),
    "sft": DvcPart(("sft",), upstream=("prepare",)),
    # the RL loop: baseline evaluation, iterations, periodic evaluations
    "rl": DvcPart(("evaluate", *ITERATION_STAGES), upstream=("prepare", "sft"),
                  flow_reads=("run.iterations", "run.eval_every"), prefect=True,
                  persist=True, orchestration=True),
    "evaluate": DvcPart(("evaluate",), upstream=("prepare", "rl"),
                        flow_reads=("run.iterations",), headline=True),
}

# learning curves (`dvc plots show`): plot name -> keys `<stage>.<metric>` of rl_curves.json
PLOTS: dict[str, tuple[str, ...]] = {
    "rl_reward": ("reward.accuracy", "reward.mean_reward"),
    "rl_policy": ("policy.loss", "policy.kl", "policy.clip_fraction", "policy.entropy"),
    "rl_value": ("value.value_loss", "value.value_mean"),
    "rl_rollout": ("rollout.response_length", "rollout.tokens_per_s"),
    "rl_seconds": ("rollout.seconds", "reward.seconds", "policy.seconds"),
    "rl_curriculum": ("curriculum.level", "curriculum.pass_rate"),
}
# held-out accuracy per evaluation (plots/eval_curve.json, written by the evaluate part;
# x = RL iterations done: 0 is the SFT baseline): plot name -> evaluate stage metrics
EVAL_PLOTS: dict[str, tuple[str, ...]] = {
    "heldout_accuracy": ("accuracy",),
}


def placement_keys() -> frozenset[str]:
    """Params keys that say where or how stages run, not what they write (the
    :class:`Resources` fields that name a key): no cache key or DVC params list has them."""
    return frozenset(v for _, spec in STAGES.items()
                     for v in (spec.resources.shards, spec.resources.shard_retries)
                     if isinstance(v, str))


def resource(spec: StageSpec, name: str, params) -> int:
    """The value of resource ``name`` (``shards``, ``shard_retries``) of ``spec`` under
    ``params`` (a ``tracerl.config.Params``): the number, or the params key's value."""
    v = getattr(spec.resources, name)
    if isinstance(v, str):
        sec, _, key = v.partition(".")
        return int(getattr(getattr(params, sec), key))
    return int(v)


def problems() -> list[str]:
    """Inconsistencies of the declarations themselves (a test keeps this empty)."""
    import dataclasses

    from tracerl.config import Params

    out = []
    sections = {f.name: f.type for f in dataclasses.fields(Params)}
    for name, spec in STAGES.items():
        for r in spec.checks:
            if "." not in r:
                out.append(f"stage {name}: check {r!r} must name one key (section.key)")
        if spec.resources.ranks and spec.resources.ranks not in spec.reads and \
                spec.resources.ranks.split(".")[0] not in spec.reads:
            out.append(f"stage {name}: its ranks key {spec.resources.ranks!r} is not in its reads")
        for r in (*spec.reads, *spec.checks, *filter(None, [spec.resources.ranks])):
            sec, _, key = r.partition(".")
            if sec not in sections:
                out.append(f"stage {name}: reads unknown params section {sec!r}")
            elif key:
                keys = {f.name for f in dataclasses.fields(getattr(Params(), sec))}
                if key not in keys:
                    out.append(f"stage {name}: reads unknown params key {r!r}")
    for name, spec in STAGES.items():
        for attr in ("shards", "shard_retries"):
            v = getattr(spec.resources, attr)
            sec, _, key = str(v).partition(".")
            if isinstance(v, str) and (sec not in sections or key not in {
                    f.name for f in dataclasses.fields(getattr(Params(), sec))}):
                out.append(f"stage {name}: resources.{attr} names unknown params key {v!r}")
    for part, p in DVC_PARTS.items():
        for s in p.stages:
            if s not in STAGES:
                out.append(f"dvc part {part}: unknown stage {s!r}")
        for u in p.upstream:
            if u not in DVC_PARTS:
                out.append(f"dvc part {part}: unknown upstream part {u!r}")
    for plot, keys in EVAL_PLOTS.items():
        out += [f"plot {plot}: {k!r} is not a declared metric of stage evaluate"
                for k in keys if k not in STAGES.get("evaluate").metrics]
    for plot, keys in PLOTS.items():
        for k in keys:
            stage, _, metric = k.partition(".")
            if stage not in STAGES:
                out.append(f"plot {plot}: {k!r} names no stage")
            elif metric != "seconds" and metric not in STAGES.get(stage).metrics:
                out.append(f"plot {plot}: {k!r} is not a declared metric of stage {stage}")
    return out


def missing_outputs(stage: str, out_dir) -> list[str]:
    """Declared output files (patterns) of ``stage`` that its finished folder lacks."""
    from pathlib import Path

    out = Path(out_dir)
    return [pat for pat in STAGES.get(stage).outputs
            if not any(p.is_file() for p in out.glob(pat))]


def missing_metrics(stage: str, metrics: dict) -> list[str]:
    """Declared metrics of ``stage`` absent from its ``metrics.json`` (``metrics``)."""
    return [k for k in STAGES.get(stage).metrics if k not in metrics]
