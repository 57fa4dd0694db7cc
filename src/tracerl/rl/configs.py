"""What the policy, value and SFT updates are configured with (stage CLIs fill them from params)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class PolicyConfig:
    """How rows are built and the policy loss computed.

    ``method``: a name of :data:`tracerl.rl.builders.ROW_BUILDERS` (``policy.method``).
    ``kl_target``: ``old`` pulls towards the pre-update policy (the reference, spec 4.6),
    ``reference`` towards a frozen reference model passed to
    :func:`~tracerl.rl.policy.policy_update`.
    ``normalize``: ``tokens`` (default) or ``padded`` (the reference's ``1/(B L1)``).
    """

    method: str = "trace_rl"
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
    """GAE over decode steps (spec 6.4) and the clipped value regression (spec 6.5)."""

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
    """``method``: a name of :data:`tracerl.rl.builders.SFT_ROW_BUILDERS` (``sft.method``):
    ``semi_ar``: block SFT (per-position mask probability in [lower_p, upper_p]) for block
    models, one semi-autoregressive decoding state per row (``mask_times`` rows per
    example, blocks of ``decode_block``) for full-attention models;
    ``trace``: TraceRL rounds from given step maps; ``random_masking``: full-attention SFT
    (one mask ratio per row, ``mask_times`` rows per example)."""

    method: str = "semi_ar"
    lower_p: float = 0.1
    upper_p: float = 0.9
    shrink: int = 1
    copies_per_row: int = 0
    mask_times: int = 1
    decode_block: int = 0  # semi_ar on a full-attention model: the decoding block size
    max_len: int = 0
    normalize: Literal["tokens", "padded"] = "tokens"
