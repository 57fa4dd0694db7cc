"""TraceRL training: trajectory rows, losses, step-level GAE, the trainer, SFT.

One home per concern: :mod:`~tracerl.rl.configs` (update configs),
:mod:`~tracerl.rl.rows` (trajectories -> rows), :mod:`~tracerl.rl.builders` (row builders
by method name), :mod:`~tracerl.rl.engine` (batching and the one step loop),
:mod:`~tracerl.rl.losses`, :mod:`~tracerl.rl.advantages` (GAE over decode steps),
:mod:`~tracerl.rl.policy`, :mod:`~tracerl.rl.value`, :mod:`~tracerl.rl.sft` (the updates),
:mod:`~tracerl.rl.trainer` (optimizer, schedule, state), :mod:`~tracerl.rl.io` (records).

Typical use (one RL iteration; the whole loop is ``examples/trace_rl_loop.py``)::

    from tracerl.rl import PolicyConfig, TokenScorer, Trainer, TrainConfig, policy_update
    trainer = Trainer(TokenScorer(model), TrainConfig(lr=1e-5))
    metrics = policy_update(trainer, samples, PolicyConfig(eps=0.2))
"""

from tracerl.rl.advantages import outcome_token_rewards, step_gae
from tracerl.rl.builders import ROW_BUILDERS, SFT_ROW_BUILDERS
from tracerl.rl.configs import PolicyConfig, SFTConfig, ValueConfig
from tracerl.rl.engine import run_steps, summarize, train_rows
from tracerl.rl.io import (
    checkpoint_dir,
    pick,
    read_scored,
    read_sft_samples,
    read_token_advantages,
    sample_from_trajectory,
    samples_from_frame,
    trainer_state_dir,
    write_token_advantages,
)
from tracerl.rl.losses import explained_variance, kl_penalty, sft_loss, trace_rl_loss, value_loss
from tracerl.rl.policy import (
    evaluate_policy_loss,
    policy_loss_factory,
    policy_update,
    prepare_policy_rows,
    trajectory_logprobs,
)
from tracerl.rl.rows import (
    Batch,
    Row,
    RowStats,
    TraceSample,
    TrajectoryError,
    block_row,
    build_masked_rows,
    build_trace_rows,
    check_sample,
    collate,
    full_row,
    packed_visibility,
    records_block_size,
    rounds_from_ranks,
    rounds_loop,
    shrink_steps,
    step_ranks,
)
from tracerl.rl.scoring import TokenScorer, ValueScorer
from tracerl.rl.sft import SFTCheckpoints, SFTProgress, sft_rows, sft_train
from tracerl.rl.trainer import TrainConfig, Trainer, lr_factor, per_rank
from tracerl.rl.value import value_update

__all__ = [
    "ROW_BUILDERS", "SFT_ROW_BUILDERS", "Batch", "PolicyConfig", "Row", "RowStats", "SFTConfig",
    "TokenScorer", "TraceSample", "TrainConfig", "Trainer", "TrajectoryError", "ValueConfig",
    "ValueScorer", "block_row", "build_masked_rows", "build_trace_rows", "check_sample",
    "checkpoint_dir", "collate", "evaluate_policy_loss", "explained_variance", "full_row",
    "kl_penalty", "lr_factor", "per_rank", "outcome_token_rewards", "packed_visibility", "pick",
    "policy_loss_factory", "policy_update", "prepare_policy_rows", "read_scored",
    "read_sft_samples", "read_token_advantages", "records_block_size", "rounds_from_ranks",
    "rounds_loop", "run_steps", "sample_from_trajectory", "samples_from_frame", "sft_loss",
    "SFTCheckpoints", "SFTProgress", "sft_rows", "sft_train", "shrink_steps", "step_gae", "step_ranks", "summarize",
    "trace_rl_loss", "train_rows", "trainer_state_dir", "trajectory_logprobs", "value_loss",
    "value_update", "write_token_advantages",
]
