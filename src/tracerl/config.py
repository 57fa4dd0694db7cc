"""Typed, validated parameters: ``params.yaml`` -> frozen dataclasses.

``params.yaml`` is the one source of hyperparameters, read by DVC (``params:`` of each
stage), the Prefect flow and every stage CLI, all through :func:`load_params`. Every
quantity is stated once (e.g. the block size lives in ``model.block_size`` and both the
sampler and the trainer read it there).

Loading collects *every* problem (missing sections, unknown keys with the nearest valid
name, wrong types with a hint for YAML's pitfalls, out-of-range values, cross-section
inconsistencies, paths that do not exist, a context too short for the longest prompt plus
the generation budget) and raises one :class:`ConfigError` that lists them all with how to
fix each, before any work starts. A file must state every section; the dataclass defaults
equal params.yaml's values (tests/test_params.py), so nothing runs on a second set. Only stage CLIs see
:class:`Params`; library functions take flat, typed arguments.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """Invalid parameters. ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str], source: str = "params.yaml"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


# --------------------------------------------------------------------------- sections
# Each section is a frozen dataclass. ``problems()`` returns a list of messages for
# values that are well-typed but out of range; cross-section rules live in Params.


@dataclass(frozen=True)
class RunParams:
    """Orchestration: where artifacts go, how many iterations, where stages run."""

    name: str = "default"
    seed: int = 0
    runs_dir: str = "runs"  # artifacts of flow runs: runs/<name>/iter_<i>/<stage>/
    iterations: int = 30  # RL iterations
    eval_every: int = 5  # evaluate every k iterations (and after the last)
    runner: Literal["inprocess", "subprocess", "container"] = "inprocess"
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    tracker: Literal["mlflow", "null"] = "mlflow"  # endpoint: $MLFLOW_TRACKING_URI
    registered_model: str = "tracerl-policy"  # final policy's registry name; "" = skip
    image_tag: str = "0.1.0"  # container runner: images tracerl-{cpu,train-gpu,rollout-gpu}:<tag>
    gpus: int = -1  # container runner: GPUs requested by GPU stages (-1 = all)

    def problems(self) -> list[str]:
        p = []
        if self.iterations < 1:
            p.append("run.iterations must be >= 1")
        if self.eval_every < 1:
            p.append("run.eval_every must be >= 1")
        if self.threads < 0:
            p.append("run.threads must be >= 0 (0 keeps torch's default)")
        if not self.name or "/" in self.name or self.name.startswith("."):
            p.append(f"run.name {self.name!r} must be a non-empty folder name without '/'")
        from tracerl.devices import device_name_problem

        if (bad := device_name_problem(self.device)) is not None:
            p.append(bad)
        if self.gpus == 0 or self.gpus < -1:
            p.append("run.gpus must be -1 (all) or >= 1")
        return p


def registry_problems(module: str, registry: str, name: str, where: str) -> list[str]:
    """``[problem]`` when ``name`` is not in the registry ``module.registry`` (a
    :class:`tracerl.registry.Registry`; imported here, lazily: this module is imported
    before torch is needed), else ``[]``. Params name registry entries; the registry is
    the one list of valid names."""
    import importlib

    problem = getattr(importlib.import_module(module), registry).problem(name, where)
    return [problem] if problem else []


@dataclass(frozen=True)
class ModelParams:
    family: str = "sdar"  # tracerl.models.FAMILIES
    # "tiny" builds the embedded default from the sizes below; anything else is a hub id
    # "org/name" or a local folder (that must exist) of a real checkpoint
    # (SDAR/TraDo/LLaDA/Dream); the rule is in tracerl.limits.
    init: str = "tiny"
    # the model's block size: the rollout's too unless curriculum.block_size_schedule says
    # otherwise; the trainer takes the block size recorded with each trajectory
    block_size: int = 4
    # weights' dtype; bfloat16 trains against fp32 master weights (tracerl.devices)
    dtype: Literal["float32", "bfloat16"] = "float32"
    # sizes of the embedded default (used only when init == "tiny")
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 512

    def problems(self) -> list[str]:
        from tracerl.limits import init_problem

        p = []
        p += registry_problems("tracerl.models.model", "FAMILIES", self.family, "model.family")
        if self.block_size < 1:
            p.append("model.block_size must be >= 1")
        if (bad := init_problem(self.init)) is not None:
            p.append(bad)
        if self.init == "tiny":
            if self.hidden_size % self.num_heads:
                p.append(
                    f"model.hidden_size ({self.hidden_size}) must be divisible by "
                    f"model.num_heads ({self.num_heads})"
                )
            if self.num_heads % self.num_kv_heads:
                p.append(
                    f"model.num_heads ({self.num_heads}) must be divisible by "
                    f"model.num_kv_heads ({self.num_kv_heads})"
                )
        return p


@dataclass(frozen=True)
class DataParams:
    # task source: "arithmetic" (the embedded default), "rg:<name>" (a reasoning-gym
    # dataset) or "file" (local task files train_file / heldout_file, see params.yaml)
    generator: str = "arithmetic"
    train_file: str = ""  # generator "file": RL pool and SFT tasks (.jsonl or .parquet)
    heldout_file: str = ""  # generator "file": held-out tasks (.jsonl or .parquet)
    # sizes: tasks generated, or at most this many read from a file (a seeded sample)
    train_size: int = 4000
    heldout_size: int = 500
    sft_size: int = 4000
    min_difficulty: int = 0
    max_difficulty: int = 3
    # SFT targets: solution style (steps | worked | answer), and the fraction of SFT
    # examples whose target is the boxed answer alone instead (a mixed corpus)
    sft_style: str = "worked"
    sft_answer_fraction: float = 0.45
    # bad records (unreadable, no answer, prompt too long for the model) are skipped and
    # counted by task id; a stage fails when it skips more than this fraction
    max_skip_fraction: float = 0.1

    def problems(self) -> list[str]:
        p = []
        for k in ("train_size", "heldout_size", "sft_size"):
            if getattr(self, k) < 1:
                p.append(f"data.{k} must be >= 1")
        from tracerl.data.prompts import SOLUTION_STYLES

        if self.sft_style not in SOLUTION_STYLES:
            p.append(f"data.sft_style must be one of {', '.join(SOLUTION_STYLES)} "
                     f"(got {self.sft_style!r})")
        if not 0.0 <= self.sft_answer_fraction <= 1.0:
            p.append(f"data.sft_answer_fraction must be in [0, 1] "
                     f"(got {self.sft_answer_fraction})")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            p.append(f"data.max_skip_fraction must be in [0, 1] (got {self.max_skip_fraction})")
        if self.min_difficulty > self.max_difficulty:
            p.append("data.min_difficulty must be <= data.max_difficulty")
        p += self._source_problems()
        return p

    def _source_problems(self) -> list[str]:
        g = self.generator
        if g != "file":  # the generators' registry, or task files
            unknown = registry_problems("tracerl.data.sources", "GENERATORS",
                                        g.partition(":")[0], "data.generator")
            if unknown:
                return [f"{unknown[0]}; or 'file' (with data.train_file and "
                        "data.heldout_file)"]
        members = [x for x in g[4:].split("+") if x] if g.startswith("mix:") else [g]
        if g.startswith("mix:") and (len(members) < 2 or any(
                x.partition(":")[0] not in ("arithmetic", "code", "rg") for x in members)):
            return [f"data.generator {g!r}: mix joins two or more of arithmetic, code, "
                    "rg:<name> with '+', e.g. mix:arithmetic+code"]
        from tracerl.data.sources import generator_levels

        p = []
        for name in members:
            levels = generator_levels(name)
            if levels is not None and (self.min_difficulty < levels[0]
                                       or self.max_difficulty > levels[-1]):
                p.append(f"data.min_difficulty..max_difficulty must lie in {levels[0]}.."
                         f"{levels[-1]} for the {name} generator (got {self.min_difficulty}"
                         f"..{self.max_difficulty})")
        if g.startswith("mix:") or g in ("arithmetic", "code"):
            return p
        if g.startswith("rg:"):
            from tracerl.data.sources import _rg_names

            return [] if g[3:] in _rg_names() else [
                f"data.generator {g!r}: no reasoning-gym dataset {g[3:]!r}; valid: rg:"
                + ", rg:".join(_rg_names())]
        if g != "file":
            return []
        p = []
        for key in ("train_file", "heldout_file"):
            f = getattr(self, key)
            if not f:
                p.append(f"data.generator 'file' needs data.{key}: a .jsonl or .parquet file")
            elif not f.endswith((".jsonl", ".parquet")):
                p.append(f"data.{key} {f!r} must be a .jsonl or .parquet file")
            elif not Path(f).is_file():
                p.append(f"data.{key} {f!r} does not exist (relative paths are read from "
                         "the folder the pipeline runs in, the project root)")
            elif Path(f).stat().st_size == 0:
                p.append(f"data.{key} {f!r} is empty: it holds no tasks")
        return p


def ranks_problems(section: str, ranks: int, zero_stage: int, grad_accum: int) -> list[str]:
    """Problems of a training section's ``ranks`` (processes per node of its stage).

    The global batch of an optimizer step never depends on the ranks: its ``grad_accum``
    micro-batches are split across the ranks (``grad_accum / world`` each), so ``ranks``
    must divide ``grad_accum``, and more than one rank needs DeepSpeed ZeRO.

    Example:
        >>> [m.split(":")[0] for m in ranks_problems("policy", 2, 0, 1)]
        ['policy.ranks = 2 needs policy.zero_stage 2 or 3 (DeepSpeed ZeRO runs the update across ranks)', 'policy.grad_accum (1) must be a multiple of policy.ranks (2)']
        >>> ranks_problems("policy", 2, 2, 4)
        []
    """
    if ranks < 1:
        return [f"{section}.ranks must be >= 1 (processes of the {section} stage per node)"]
    p = []
    if ranks > 1 and zero_stage not in (2, 3):
        p.append(f"{section}.ranks = {ranks} needs {section}.zero_stage 2 or 3 (DeepSpeed "
                 f"ZeRO runs the update across ranks): set {section}.zero_stage: 2, or "
                 f"{section}.ranks: 1")
    if grad_accum >= 1 and grad_accum % ranks:
        want = -(-grad_accum // ranks) * ranks
        p.append(f"{section}.grad_accum ({grad_accum}) must be a multiple of {section}.ranks "
                 f"({ranks}): an optimizer step runs grad_accum micro-batches split across "
                 f"the ranks, so the global batch is the same for any ranks: set "
                 f"{section}.grad_accum: {want} (or a multiple), or {section}.ranks: 1")
    return p


@dataclass(frozen=True)
class LoraParams:
    """LoRA adapters of a training stage (``sft.lora``, ``policy.lora``; tracerl.models.lora).

    rank 0 = off (full fine-tuning). Only the adapters train (optimizer state only for
    them); the stage writes merged weights (what rollout/evaluate load) plus ``adapter/``.
    """

    rank: int = 0
    alpha: float = 16.0  # the update is (alpha / rank) * B @ A
    dropout: float = 0.0
    # leaf names of the backbone's linear layers (checked against the model at load)
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    def spec(self):
        """The library's :class:`tracerl.models.lora.LoraSpec`."""
        from tracerl.models.lora import LoraSpec

        return LoraSpec(rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                        target_modules=tuple(self.target_modules))

    def stage_problems(self, where: str, zero_stage: int) -> list[str]:
        from tracerl.models.lora import DEFAULT_TARGETS, spec_problems

        p = spec_problems(self.spec(), where)
        # every backbone tracerl builds (Qwen3, Qwen2, Llama) names its linear layers so;
        # the loaded model's own names are checked again when the adapters are applied
        unknown = [t for t in self.target_modules if t not in DEFAULT_TARGETS]
        if unknown:
            p.append(f"{where}.target_modules {unknown} are not linear layers of the "
                     f"backbones tracerl builds (Qwen3, Qwen2, Llama); choose among "
                     f"{list(DEFAULT_TARGETS)}")
        if self.rank > 0 and zero_stage == 3:
            section = where.split(".")[0]
            p.append(f"{where}.rank > 0 with {section}.zero_stage 3 is not supported (ZeRO-3 "
                     "partitions the base weights the adapters are merged into): use "
                     f"{section}.zero_stage 0 or 2, or {where}.rank: 0")
        return p

    def problems(self) -> list[str]:
        return []  # checked by the stage section that holds it (stage_problems)


@dataclass(frozen=True)
class SFTParams:
    # semi_ar: the states of block-by-block decoding (block SFT for block models; for
    # full-attention ones, one state per row: blocks before clean, one block partly masked,
    # the rest masked; model.block_size is the decoding block); trace: TraceRL rounds from
    # step maps (or left to right); random_masking: full-attention SFT (LLaDA/Dream)
    method: str = "semi_ar"  # tracerl.rl.SFT_ROW_BUILDERS
    steps: int = 2000  # optimizer steps
    batch_size: int = 32  # examples per optimizer step, whatever the ranks (split across them)
    grad_accum: int = 1
    lr: float = 2e-3
    warmup_steps: int = 50
    schedule: Literal["constant", "cosine"] = "cosine"  # cosine decays over `steps`
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    lower_p: float = 0.1
    upper_p: float = 0.9
    mask_times: int = 1  # random_masking: rows per example
    shrink: int = 1  # trace: merge s neighbouring steps
    max_len: int = 0  # skip examples with prompt + response longer (0 = no limit)
    normalize: Literal["tokens", "padded"] = "tokens"  # reference: padded
    max_grad_norm: float = 1.0
    bf16: bool = False  # bf16 autocast over model.dtype float32 weights (tracerl.devices)
    gradient_checkpointing: bool = False
    zero_stage: int = 0  # 0 = off; 2/3 = DeepSpeed ZeRO (multi-process launch)
    # processes per node (torchrun); they split each step's grad_accum micro-batches
    ranks: int = 1
    seed: int = 0
    # save model, optimizer, schedule, RNG and data order every N steps (0 = never); a
    # killed SFT resumes there with the same result as an uninterrupted run
    checkpoint_every: int = 200
    # validation: greedy accuracy on val_tasks tasks of the RL pool (the train split, never
    # the held-out one) every val_every steps (0 = never), decoding val_max_tokens tokens;
    # SFT stops once it reaches stop_at (0 = run all steps). val_pick: "first" (the pool's
    # first tasks, level-balanced) or "sample" (a run.seed sample, levels as in the pool)
    val_every: int = 0
    val_tasks: int = 100
    val_pick: Literal["first", "sample"] = "first"
    val_max_tokens: int = 64
    stop_at: float = 0.0
    lora: LoraParams = field(default_factory=LoraParams)  # rank 0 = full fine-tuning

    def problems(self) -> list[str]:
        p = registry_problems("tracerl.rl.builders", "SFT_ROW_BUILDERS", self.method, "sft.method")
        p += self.lora.stage_problems("sft.lora", self.zero_stage)
        if self.checkpoint_every < 0:
            p.append("sft.checkpoint_every must be >= 0 (0 = no mid-run checkpoints)")
        if self.val_every < 0 or self.val_tasks < 1 or self.val_max_tokens < 1:
            p.append("sft.val_every must be >= 0 (0 = no validation), sft.val_tasks and "
                     "sft.val_max_tokens >= 1")
        if not 0.0 <= self.stop_at <= 1.0:
            p.append(f"sft.stop_at must be in [0, 1] (0 = off), got "
                     f"{self.stop_at}")
        if self.stop_at > 0 and self.val_every == 0:
            p.append("sft.stop_at needs validation: set sft.val_every > 0 (e.g. 50)")
        if not 0.0 <= self.lower_p <= self.upper_p <= 1.0:
            p.append("sft.lower_p and sft.upper_p must satisfy 0 <= lower_p <= upper_p <= 1")
        if self.steps < 0 or self.batch_size < 1:
            p.append("sft.steps must be >= 0 and sft.batch_size >= 1")
        if self.grad_accum < 1 or self.batch_size % self.grad_accum:
            p.append(f"sft.batch_size ({self.batch_size}) must be a multiple of sft.grad_accum "
                     f"({self.grad_accum})")
        if self.lr <= 0:
            p.append("sft.lr must be > 0")
        if self.mask_times < 1 or self.shrink < 1:
            p.append("sft.mask_times and sft.shrink must be >= 1")
        if self.zero_stage not in (0, 2, 3):
            p.append("sft.zero_stage must be 0 (off), 2 or 3")
        p += ranks_problems("sft", self.ranks, self.zero_stage, self.grad_accum)
        return p


@dataclass(frozen=True)
class RolloutParams:
    tasks_per_iter: int = 32
    responses_per_task: int = 8  # group size k
    max_tokens: int = 40  # generation budget; must be a multiple of model.block_size
    steps_per_block: int = 4  # T, denoising steps per block
    strategy: str = "low_confidence_static"  # tracerl.sampling.STRATEGIES
    dynamic_threshold: float = 0.9
    entropy_bound: float = 0.35
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    batch_size: int = 64  # sequences decoded together
    # full-attention models: "none" (exact, the whole canvas every step) or "prefix" (the
    # approximate prefix KV cache of Fast-dLLM; old log-probs are then recomputed)
    full_cache: str = "none"
    # shards run side by side and merged bit-identical (where it runs, not what: no cache key)
    shards: int = 1
    shard_retries: int = 1  # Prefect retries of a failed shard
    # torch.compile the denoising forward (same trajectories; pays compile time once per
    # process: bench/bench_compile.py, docs/benchmarks.md)
    compile: bool = False

    def problems(self) -> list[str]:
        p = registry_problems("tracerl.sampling.strategies", "STRATEGIES", self.strategy,
                              "rollout.strategy")
        if self.responses_per_task < 2:
            p.append(
                "rollout.responses_per_task must be >= 2: group-normalised advantages "
                "need at least two responses per task"
            )
        if self.tasks_per_iter < 1 or self.batch_size < 1 or self.steps_per_block < 1:
            p.append("rollout.tasks_per_iter, batch_size and steps_per_block must be >= 1")
        from tracerl.sampling.generate import FULL_CACHES

        if self.full_cache not in FULL_CACHES:
            p.append(f"rollout.full_cache {self.full_cache!r} invalid; use one of "
                     f"{', '.join(FULL_CACHES)}")
        if self.temperature < 0:
            p.append("rollout.temperature must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            p.append("rollout.top_p must be in (0, 1]")
        if self.top_k < 0:
            p.append("rollout.top_k must be >= 0 (0 = off)")
        if self.shards < 1:
            p.append(f"rollout.shards must be >= 1 (1 = one unsharded rollout), got "
                     f"{self.shards}")
        if self.shard_retries < 0:
            p.append(f"rollout.shard_retries must be >= 0 (0 = a failed shard fails the run), "
                     f"got {self.shard_retries}")
        return p


# the reward params that decide whether a response is correct: the reward stage, the
# evaluate stage and SFT validation all grade with them (tracerl.rewards.grading_options)
GRADING_PARAMS = ("overlong_is_wrong", "verify_timeout_s", "code_timeout_s", "code_memory_mb",
                  "code_workers", "unsafe_allow_unsandboxed_code")


@dataclass(frozen=True)
class RewardParams:
    # group filter: "none", "zero_variance" (drop all-equal groups) or "accuracy_band"
    # (drop groups whose accuracy is outside [filter_low, filter_high], the reference's rule)
    group_filter: str = "zero_variance"  # tracerl.rewards.GROUP_FILTERS
    # group-normalised advantage: "zscore" (the reference) or "mean_center" (Dr. GRPO)
    advantage: str = "zscore"  # tracerl.rewards.ADVANTAGES
    filter_low: float = 0.2
    filter_high: float = 0.8
    overlong_is_wrong: bool = True  # a response cut off by the budget counts as wrong
    verify_timeout_s: float = 5.0
    code_timeout_s: float = 5.0
    code_memory_mb: int = 512
    code_workers: int = 4
    # UNSAFE: grade generated code even where the sandbox's isolation (root, unshare,
    # seccomp) is missing; the program can then read host files and use the network.
    # Off: grading refuses with an error naming what is missing.
    unsafe_allow_unsandboxed_code: bool = False
    # process reward (LLM judge, spec 3.4): "none", "hf" (transformers) or "vllm" (GPU);
    # per-token rewards go to scored.token_rewards and from there into the value's GAE
    process_reward: Literal["none", "hf", "vllm"] = "none"
    process_judge: str = "tiny"  # local folder or hub id; hf "tiny" = random CPU test judge
    process_chunk_len: int = 200  # response tokens per judged chunk
    process_k_sample: int = 3  # judge samples per chunk

    def problems(self) -> list[str]:
        p = (registry_problems("tracerl.rewards.advantages", "GROUP_FILTERS", self.group_filter,
                               "reward.group_filter")
             + registry_problems("tracerl.rewards.advantages", "ADVANTAGES", self.advantage,
                                 "reward.advantage"))
        if not 0.0 <= self.filter_low <= self.filter_high <= 1.0:
            p.append("reward.filter_low and filter_high must satisfy 0 <= low <= high <= 1")
        if self.code_workers < 1 or self.code_workers > 128:
            p.append("reward.code_workers must be in [1, 128] (concurrent sandboxes)")
        if self.process_chunk_len < 1 or self.process_k_sample < 1:
            p.append("reward.process_chunk_len and process_k_sample must be >= 1")
        if self.process_reward != "none" and not self.process_judge:
            p.append("reward.process_judge must name the judge model (a local folder, a hub "
                     "id, or 'tiny' for the CPU test judge) when process_reward is on")
        if self.process_reward == "vllm" and self.process_judge == "tiny":
            p.append("reward.process_judge 'tiny' is the transformers CPU test judge: use "
                     "process_reward: hf, or name a real model for vllm")
        return p


@dataclass(frozen=True)
class PolicyParams:
    method: str = "trace_rl"  # tracerl.rl.ROW_BUILDERS
    use_value: bool = False  # token advantages from the value model (GAE over steps)
    lr: float = 1e-4
    epochs: int = 1  # passes over one iteration's rows
    micro_batch: int = 16  # rows per forward
    grad_accum: int = 1
    eps: float = 0.2  # clip range
    beta: float = 0.0  # KL coefficient
    kl_estimator: Literal["k1", "k3"] = "k3"
    kl_target: Literal["old", "reference"] = "old"  # reference = frozen initial policy
    normalize: Literal["tokens", "padded"] = "tokens"  # reference: "padded" (divide by L1)
    shrink: int = 1  # merge s neighbouring decode steps into one training step
    max_grad_norm: float = 1.0
    lower_p: float = 0.1  # random_masking / coupled mask-probability range
    upper_p: float = 0.9
    mask_times: int = 1  # random_masking / coupled rows per sample (full-attention models)
    weight_decay: float = 0.0
    warmup_steps: int = 5
    schedule: Literal["constant", "cosine"] = "cosine"  # over the whole run, never reset
    total_steps: int = 300  # cosine horizon in optimizer steps of the run
    min_lr_ratio: float = 0.1
    copies_per_row: int = 0  # noisy copies packed per row (0 = all rounds; 1 = reference)
    max_len: int = 0  # skip (and count) samples with prompt + response longer (0 = no limit)
    shuffle: bool = True
    bf16: bool = False  # bf16 autocast over model.dtype float32 weights (tracerl.devices)
    gradient_checkpointing: bool = False
    zero_stage: int = 0  # 0 = off; 2/3 = DeepSpeed ZeRO (multi-process launch)
    # processes per node (torchrun); they split each step's grad_accum micro-batches
    ranks: int = 1
    seed: int = 0
    lora: LoraParams = field(default_factory=LoraParams)  # rank 0 = full fine-tuning

    def problems(self) -> list[str]:
        p = registry_problems("tracerl.rl.builders", "ROW_BUILDERS", self.method, "policy.method")
        p += self.lora.stage_problems("policy.lora", self.zero_stage)
        if self.lr <= 0:
            p.append("policy.lr must be > 0")
        if self.schedule == "cosine" and self.total_steps < 1:
            p.append("policy.schedule 'cosine' needs policy.total_steps >= 1")
        if self.zero_stage not in (0, 2, 3):
            p.append("policy.zero_stage must be 0 (off), 2 or 3")
        if self.copies_per_row < 0 or self.max_len < 0 or self.mask_times < 1:
            p.append("policy.copies_per_row and max_len must be >= 0, mask_times >= 1")
        if not 0 < self.eps < 1:
            p.append("policy.eps must be in (0, 1)")
        if self.beta < 0:
            p.append("policy.beta must be >= 0")
        if self.shrink < 1:
            p.append("policy.shrink must be >= 1")
        if self.micro_batch < 1 or self.grad_accum < 1 or self.epochs < 1:
            p.append("policy.micro_batch, grad_accum and epochs must be >= 1")
        if not 0.0 <= self.lower_p <= self.upper_p <= 1.0:
            p.append("policy.lower_p and upper_p must satisfy 0 <= lower_p <= upper_p <= 1")
        p += ranks_problems("policy", self.ranks, self.zero_stage, self.grad_accum)
        return p


@dataclass(frozen=True)
class ValueParams:
    lr: float = 1e-4
    gamma: float = 1.0
    lam: float = 1.0
    clip: float = 0.2  # value clip range
    epochs: int = 1
    micro_batch: int = 16
    grad_accum: int = 1
    train_every: int = 1  # train the value model every k iterations (advantages always)
    shrink: int = 1  # merge s neighbouring decode steps (GAE time steps)
    copies_per_row: int = 0
    max_len: int = 0
    normalize: Literal["tokens", "padded"] = "tokens"  # reference: padded
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    warmup_steps: int = 0
    bf16: bool = False  # bf16 autocast over model.dtype float32 weights (tracerl.devices)
    gradient_checkpointing: bool = False
    zero_stage: int = 0
    # processes per node (torchrun); they split each step's grad_accum micro-batches
    ranks: int = 1
    seed: int = 0
    # LoRA on the value model's backbone (the scalar head trains in full), as policy.lora
    lora: LoraParams = field(default_factory=LoraParams)

    def problems(self) -> list[str]:
        p = self.lora.stage_problems("value.lora", self.zero_stage)
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            p.append("value.gamma and value.lam must be in [0, 1]")
        if self.lr <= 0:
            p.append("value.lr must be > 0")
        if self.micro_batch < 1 or self.grad_accum < 1 or self.epochs < 1 or self.train_every < 1:
            p.append("value.micro_batch, grad_accum, epochs and train_every must be >= 1")
        if self.shrink < 1 or self.clip <= 0:
            p.append("value.shrink must be >= 1 and value.clip > 0")
        if self.zero_stage not in (0, 2, 3):
            p.append("value.zero_stage must be 0 (off), 2 or 3")
        p += ranks_problems("value", self.ranks, self.zero_stage, self.grad_accum)
        return p


@dataclass(frozen=True)
class CurriculumParams:
    """Task-pool and schedule policy between RL iterations (see tracerl.curriculum)."""

    enabled: bool = True  # false = policy "fixed" over all data difficulty levels
    policy: str = "pass_rate_band"  # registry name in tracerl.curriculum.POLICIES
    raise_above: float = 0.8  # pool pass rate above which difficulty goes up
    lower_below: float = 0.2  # ... below which it goes down
    window: int = 1  # iterations of pass rates the decision looks at
    step: int = 1  # difficulty levels moved per decision
    start_level: int = 0  # difficulty level of iteration 0, within data.[min,max]_difficulty
    cumulative: bool = True  # pool = levels min..current (moves on the current level's rate)
    retire_above: float | None = None  # drop tasks whose pass rate >= this (null = keep all)
    # level up after this many decisions in a row inside the band (null = only above
    # raise_above): a plateau just under raise_above no longer holds the run at one level
    patience: int | None = 3
    # [[from_iteration, value], ...]; empty = model.block_size / rollout.max_tokens throughout
    block_size_schedule: list[list[int]] = field(default_factory=list)
    max_tokens_schedule: list[list[int]] = field(default_factory=list)
    # the policy update's block size: a multiple of the rollout's block in force (empty =
    # train at the block the trajectories were decoded with)
    train_block_size_schedule: list[list[int]] = field(default_factory=list)
    # token budget by difficulty level: [[level, max_tokens], ...]; the pool's top level
    # picks the last entry at or below it (never below the max_tokens schedule's value)
    max_tokens_by_level: list[list[int]] = field(default_factory=list)

    def problems(self) -> list[str]:
        from tracerl.curriculum import schedule_problems

        p = registry_problems("tracerl.curriculum", "POLICIES", self.policy, "curriculum.policy")
        if not 0 <= self.lower_below < self.raise_above <= 1:
            p.append("curriculum.lower_below must be < curriculum.raise_above, both in [0, 1]")
        if self.window < 1 or self.step < 1:
            p.append("curriculum.window and curriculum.step must be >= 1")
        if self.patience is not None and self.patience < 1:
            p.append(f"curriculum.patience must be >= 1 or null, got {self.patience}")
        if self.retire_above is not None and not 0 < self.retire_above <= 1:
            p.append("curriculum.retire_above must be in (0, 1] or null")
        p += schedule_problems(self.block_size_schedule, "curriculum.block_size_schedule")
        p += schedule_problems(self.max_tokens_schedule, "curriculum.max_tokens_schedule")
        p += schedule_problems(self.train_block_size_schedule,
                               "curriculum.train_block_size_schedule")
        p += schedule_problems(self.max_tokens_by_level, "curriculum.max_tokens_by_level",
                               "level")
        return p

    def cross_problems(self, params: Params) -> list[str]:
        """Rules that involve other sections (called by :meth:`Params.problems`)."""
        from tracerl.curriculum import value_at

        p = []
        d = params.data
        if not d.min_difficulty <= self.start_level <= d.max_difficulty:
            p.append(
                f"curriculum.start_level ({self.start_level}) must lie in "
                f"[data.min_difficulty, data.max_difficulty] = [{d.min_difficulty}, {d.max_difficulty}]"
            )
        changes = {0} | {int(e[0]) for e in self.block_size_schedule + self.max_tokens_schedule
                         if len(e) == 2}
        for it in sorted(changes):
            b = value_at(self.block_size_schedule, it, params.model.block_size)
            m = value_at(self.max_tokens_schedule, it, params.rollout.max_tokens)
            if it and b >= 1 and m % b:  # iteration 0 without schedules is checked by Params
                p.append(
                    f"from iteration {it} the curriculum schedules give max_tokens {m}, not a "
                    f"multiple of block size {b}; fix curriculum.*_schedule"
                )
        sched = [self.block_size_schedule, self.train_block_size_schedule]
        for it in sorted({0} | {int(e[0]) for s in sched for e in s if len(e) == 2}):
            b = value_at(self.block_size_schedule, it, params.model.block_size)
            t = value_at(self.train_block_size_schedule, it, b)
            if b >= 1 and t >= 1 and t % b:
                p.append(
                    f"from iteration {it} the training block size {t} is not a multiple of the "
                    f"rollout block size {b}: a training block must hold whole rollout blocks; "
                    "fix curriculum.train_block_size_schedule (or block_size_schedule)")
        return p


@dataclass(frozen=True)
class EvaluateParams:
    """Held-out benchmarks; every score is stored next to its full decoding config.

    Block size, steps per block, dynamic threshold and the token budget are those of
    ``model``/``rollout`` (and the curriculum schedule) at the evaluated iteration, so
    that a score is comparable to the rollouts that trained it.
    """

    # "heldout" (the generated held-out split), "humaneval", or a tracerl.data.HF_DATASETS
    # name (e.g. "math500"; needs the datasets package and network access)
    benchmarks: list[str] = field(default_factory=lambda: ["heldout"])
    heldout_size: int = 500  # tasks of the held-out split scored by evaluate
    responses_per_task: int = 1  # k for avg@k
    pass_k: list[int] = field(default_factory=lambda: [1])  # pass@k reported for each k
    # one pass per strategy: static and dynamic decoding, as in the paper's tables
    strategies: list[str] = field(
        default_factory=lambda: ["low_confidence_static", "low_confidence_dynamic"]
    )
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    # more block sizes to decode the benchmarks at, besides the one in force (block-size
    # adaptation: how the model does at larger blocks); [] = only the one in force
    block_sizes: list[int] = field(default_factory=list)
    # token budget of every evaluation (0 = the one in force at the evaluated iteration);
    # set it under a token-budget curriculum so the SFT and final scores are comparable
    max_tokens: int = 0

    def problems(self) -> list[str]:
        p = []
        if self.max_tokens < 0:
            p.append(f"evaluate.max_tokens must be >= 0 (0 = the budget in force), got "
                     f"{self.max_tokens}")
        if any(b < 1 for b in self.block_sizes) or len(set(self.block_sizes)) < len(self.block_sizes):
            p.append(f"evaluate.block_sizes {self.block_sizes} must be distinct sizes >= 1")
        if self.responses_per_task < 1:
            p.append("evaluate.responses_per_task must be >= 1")
        if self.heldout_size < 1:
            p.append("evaluate.heldout_size must be >= 1")
        bad_k = [k for k in self.pass_k if not 1 <= k <= self.responses_per_task]
        if bad_k:
            p.append(
                f"evaluate.pass_k {bad_k} must lie in [1, evaluate.responses_per_task="
                f"{self.responses_per_task}]; raise responses_per_task or drop them"
            )
        from tracerl.sampling.strategies import STRATEGIES

        valid = STRATEGIES.names()
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies:
            p.append(
                f"evaluate.strategies {unknown or '[]'} invalid; use a non-empty list of: "
                f"{', '.join(valid)}"
            )
        from tracerl.data.sources import HF_DATASETS

        known_b = ("heldout", "humaneval", *HF_DATASETS)
        bad_b = [b for b in self.benchmarks if b not in known_b]
        if bad_b or not self.benchmarks:
            p.append(
                f"evaluate.benchmarks {bad_b or '[]'} invalid; use a non-empty list of: "
                f"{', '.join(known_b)}"
            )
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            p.append("evaluate: temperature >= 0, top_p in (0, 1], top_k >= 0 required")
        return p


@dataclass(frozen=True)
class Params:
    run: RunParams = field(default_factory=RunParams)
    model: ModelParams = field(default_factory=ModelParams)
    data: DataParams = field(default_factory=DataParams)
    sft: SFTParams = field(default_factory=SFTParams)
    rollout: RolloutParams = field(default_factory=RolloutParams)
    reward: RewardParams = field(default_factory=RewardParams)
    policy: PolicyParams = field(default_factory=PolicyParams)
    value: ValueParams = field(default_factory=ValueParams)
    curriculum: CurriculumParams = field(default_factory=CurriculumParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)

    def problems(self) -> list[str]:
        p: list[str] = []
        for f in dataclasses.fields(self):
            p.extend(getattr(self, f.name).problems())
        b = self.model.block_size
        if b >= 1 and self.rollout.max_tokens % b:
            p.append(
                f"rollout.max_tokens ({self.rollout.max_tokens}) must be a multiple of "
                f"model.block_size ({b}); e.g. set it to {max(b, self.rollout.max_tokens // b * b)}"
            )
        if b >= 1 and self.sft.val_every and self.sft.val_max_tokens % b:
            p.append(f"sft.val_max_tokens ({self.sft.val_max_tokens}) must be a multiple of "
                     f"model.block_size ({b}); e.g. {max(b, self.sft.val_max_tokens // b * b)}")
        # steps per block are capped at the block in force: more than the largest block the
        # run decodes with (schedules, evaluate.block_sizes) can never apply
        largest = max([b, *(x for x, _ in decoding_budgets(self))]) if b >= 1 else b
        if self.rollout.strategy == "low_confidence_static" and self.rollout.steps_per_block > largest:
            p.append(
                f"rollout.steps_per_block ({self.rollout.steps_per_block}) > the largest block "
                f"size the run decodes with ({largest}) leaves static steps that unmask "
                "nothing; use steps_per_block <= block_size")
        p.extend(self.curriculum.cross_problems(self))
        if b >= 1:
            p.extend(self._budget_problems())
        p.extend(self._context_problems())
        return p

    def _budget_problems(self) -> list[str]:
        """Decoding runs whole blocks: each budget must be a multiple of each block size it
        is decoded with (budgets by level and evaluation's; the schedules are checked by
        :meth:`CurriculumParams.cross_problems`)."""
        sched, blocks, by_level, evals, eval_blocks = _budget_parts(self)
        p = []
        for level, m in by_level:
            bad = [b for b in blocks if b >= 1 and m % b]
            if bad:
                p.append(f"curriculum.max_tokens_by_level: level {level}'s budget {m} is not a "
                         f"multiple of the rollout block size {bad[0]}; use a multiple of "
                         f"{', '.join(map(str, blocks))}")
        # a fixed evaluation budget meets every block; else only the extra sizes are new
        for b in eval_blocks if self.evaluate.max_tokens else self.evaluate.block_sizes:
            bad = [m for m in evals if b >= 1 and m % b]
            if bad:
                p.append(f"evaluate: the token budget {bad[0]} is not a multiple of block size "
                         f"{b}; decoding runs whole blocks: set evaluate.max_tokens (or the "
                         "rollout budgets) to a multiple of every evaluated block size")
        return p

    def _context_problems(self) -> list[str]:
        """The embedded default's context must hold the generator's longest prompt plus
        every budget of the run (task files and real checkpoints: the prepare stage)."""
        from tracerl.data.sources import longest_prompt
        from tracerl.limits import default_prompt_tokens, longest_canvas

        m, d = self.model, self.data
        levels = list(range(d.min_difficulty, d.max_difficulty + 1))
        if m.init != "tiny" or not levels or m.block_size < 1 or d._source_problems():
            return []
        text = longest_prompt(d.generator, levels)
        if text is None:
            return []
        budgets = decoding_budgets(self)
        need = longest_canvas(default_prompt_tokens(text), budgets)
        if need <= m.max_position_embeddings:
            return []
        return [f"model.max_position_embeddings ({m.max_position_embeddings}) is below what "
                f"the longest prompt needs: {text!r} is {default_prompt_tokens(text)} tokens, "
                f"and with the run's budgets (block size, max_tokens) {budgets} decoding needs "
                f"{need} positions; raise model.max_position_embeddings to >= {need} or lower "
                "rollout.max_tokens (and curriculum.max_tokens_schedule / max_tokens_by_level, "
                "evaluate.max_tokens)"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _budget_parts(p: Params):
    """``(schedule pairs, their block sizes, [(level, budget)], evaluation budgets,
    evaluation block sizes)`` of a run; entries that are not pairs are left out (params
    validation names them)."""
    from tracerl.limits import run_budgets

    c, e = p.curriculum, p.evaluate
    sched = run_budgets(p.model.block_size, p.rollout.max_tokens,
                        c.block_size_schedule, c.max_tokens_schedule)
    blocks = list(dict.fromkeys(b for b, _ in sched))
    by_level = [(x[0], x[1]) for x in c.max_tokens_by_level if len(x) == 2]
    evals = [e.max_tokens] if e.max_tokens else list(dict.fromkeys(
        [m for _, m in sched] + [m for _, m in by_level]))
    return sched, blocks, by_level, evals, [*blocks, *e.block_sizes]


def decoding_budgets(p: Params) -> list[tuple[int, int]]:
    """Every ``(block_size, max_tokens)`` a run decodes with: rollouts (the block and
    token schedules, the budgets by level) and evaluation (its block sizes and budget).
    A function of the params (not a method) so that a stage's guarded params record
    what it reads.

    >>> decoding_budgets(params_from_dict({"curriculum": {"max_tokens_by_level": [[2, 80]]},
    ...                  "evaluate": {"block_sizes": [8], "max_tokens": 80}}))
    [(4, 40), (4, 80), (8, 80)]
    """
    sched, blocks, by_level, evals, eval_blocks = _budget_parts(p)
    out = [*sched, *((b, m) for b in blocks for _, m in by_level),
           *((b, m) for b in eval_blocks for m in evals)]
    return list(dict.fromkeys(out))


# --------------------------------------------------------------------------- loading


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (list, typing.List):  # noqa: UP006
        (inner,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if origin in (types.UnionType, typing.Union):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _yaml_float(x: float) -> str:
    """``x`` written so that YAML 1.1 reads a float: ``1e-4`` -> ``1.0e-4``."""
    mant, exp = f"{x:e}".split("e")
    mant = mant.rstrip("0")
    mant += "0" if mant.endswith(".") else ""
    return f"{mant}e{int(exp):+d}" if int(exp) else mant


def _yaml_hint(value: Any, tp: Any) -> str:
    """How to write ``value`` so that YAML reads it as ``tp`` (YAML 1.1 pitfalls)."""
    accepts = typing.get_args(tp) if typing.get_origin(tp) in (types.UnionType,
                                                                typing.Union) else (tp,)
    if float in accepts and isinstance(value, str):
        try:
            x = float(value)
        except ValueError:
            return ""
        return (f"; YAML reads {value!r} as text, not a number (a float needs a dot and a "
                f"signed exponent): write {_yaml_float(x)}")
    if int in accepts and isinstance(value, str | float) and not isinstance(value, bool):
        try:
            x = float(value)
        except ValueError:
            return ""
        return f"; write a plain integer: {int(x)}" if x.is_integer() else ""
    if str in accepts and isinstance(value, bool):
        return ("; YAML reads unquoted yes/no/on/off/true/false as booleans: put the value "
                "in quotes, e.g. 'no'")
    if str in accepts and isinstance(value, int | float):
        return f"; YAML reads it as a number: put it in quotes, e.g. '{value}'"
    if bool in accepts and isinstance(value, int | str):
        return "; write true or false"
    return ""


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    """Build dataclass ``cls`` from ``raw``, appending every problem found."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{prefix or 'top level'} must be a mapping, got {type(raw).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(names)}"
            problems.append(f"unknown key '{where}'{hint}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, where, problems)
        elif not _type_ok(value, tp):
            problems.append(f"'{where}' = {value!r} has the wrong type: expected "
                            f"{_describe(tp)}{_yaml_hint(value, tp)}")
        else:
            kwargs[key] = float(value) if tp is float else value
    return cls(**kwargs)


def params_from_dict(raw: dict[str, Any], source: str = "params.yaml", *,
                     require_sections: bool = False) -> Params:
    """Validate ``raw`` into :class:`Params`, listing every problem in one ConfigError.

    ``require_sections`` (what :func:`load_params` asks for a file): every section must
    be stated, so that nothing runs on a default nobody wrote down. Programmatic callers
    may leave sections out; a section's defaults equal the repository's params.yaml
    (tests/test_params.py proves it).
    """
    problems: list[str] = []
    if require_sections:
        problems.extend(missing_sections(raw))
    params = _build(Params, raw, "", problems)
    problems.extend(params.problems())  # range problems too, also of sections that parsed
    if problems:
        raise ConfigError(problems, source)
    return params


def missing_sections(raw: Any) -> list[str]:
    """One problem per section of :class:`Params` absent from ``raw`` (or one for an
    empty file)."""
    if raw is None or raw == {}:
        return ["the file is empty: start from the repository's params.yaml, which states "
                "every section and key"]
    if not isinstance(raw, dict):
        return []  # reported by _build
    return [
        f"section '{f.name}:' is missing; copy it from the repository's params.yaml (or "
        f"write '{f.name}: {{}}' to take its embedded defaults on purpose)"
        for f in dataclasses.fields(Params) if f.name not in raw
    ]


def load_params(path: str | os.PathLike = "params.yaml", overrides: dict | None = None) -> Params:
    """Load and validate ``params.yaml``; ``overrides`` is a nested dict merged on top.
    Every section must be stated in the file (:func:`missing_sections`).

    Raises:
        FileNotFoundError: the file does not exist.
        ConfigError: listing every problem in the file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"parameters file not found: {path}. Run from the project root or pass --params."
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {e}"], str(path)) from e
    if raw is None or raw == {}:
        raise ConfigError(missing_sections(raw), str(path))
    if overrides:
        raw = _merge(raw, overrides) if isinstance(raw, dict) else raw
    return params_from_dict(raw, str(path), require_sections=True)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out
