"""TraceRL training: trajectory rows, losses, step-level GAE, the trainer, SFT.

Typical use (one RL iteration, see ``stages/policy.py``)::

    from tracerl.rl import PolicyConfig, TokenScorer, Trainer, TrainConfig, policy_update
    trainer = Trainer(TokenScorer(model), TrainConfig(lr=1e-5))
    metrics = policy_update(trainer, samples, PolicyConfig(eps=0.2))
"""

from tracerl.rl.advantages import outcome_token_rewards, step_gae
from tracerl.rl.io import (
    checkpoint_dir,
    pick,
    read_scored,
    read_sft_samples,
    read_token_advantages,
    samples_from_frame,
    trainer_state_dir,
    write_token_advantages,
)
from tracerl.rl.losses import explained_variance, kl_penalty, sft_loss, trace_rl_loss, value_loss
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
    rounds_from_ranks,
    rounds_loop,
    shrink_steps,
    step_ranks,
)
from tracerl.rl.scoring import TokenScorer, ValueScorer
from tracerl.rl.trainer import TrainConfig, Trainer, lr_factor
from tracerl.rl.update import (
    ROW_BUILDERS,
    PolicyConfig,
    SFTConfig,
    ValueConfig,
    evaluate_policy_loss,
    policy_update,
    prepare_policy_rows,
    sft_rows,
    sft_train,
    summarize,
    train_rows,
    trajectory_logprobs,
    value_update,
)

__all__ = [
    "ROW_BUILDERS", "Batch", "PolicyConfig", "Row", "RowStats", "SFTConfig", "TokenScorer",
    "TraceSample", "TrainConfig", "Trainer", "TrajectoryError", "ValueConfig", "ValueScorer",
    "block_row", "build_masked_rows", "build_trace_rows", "check_sample", "collate",
    "evaluate_policy_loss", "explained_variance", "full_row", "kl_penalty", "lr_factor",
    "outcome_token_rewards", "packed_visibility", "policy_update", "prepare_policy_rows",
    "read_scored", "read_sft_samples", "read_token_advantages", "rounds_from_ranks", "rounds_loop",
    "samples_from_frame", "sft_loss", "sft_rows", "sft_train", "shrink_steps", "step_gae",
    "step_ranks", "summarize", "trace_rl_loss", "train_rows", "trajectory_logprobs",
    "value_loss", "value_update", "write_token_advantages", "checkpoint_dir", "pick",
    "trainer_state_dir",
]
