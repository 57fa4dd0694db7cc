"""The rollout engine: batched, KV-cached block-diffusion sampling with decoding traces.

Example:
    >>> import torch
    >>> from tracerl.models import tiny_model
    >>> from tracerl.sampling import SamplingConfig, generate
    >>> model, tok = tiny_model()
    >>> cfg = SamplingConfig(block_size=4, steps_per_block=4, max_tokens=8, batch_size=2)
    >>> trajs = generate(model, [tok.encode("2+2="), tok.encode("10+7=")], cfg,
    ...                  generator=torch.Generator().manual_seed(0))
    >>> [len(t.response_ids) == len(t.decode_steps) == len(t.logprobs) for t in trajs]
    [True, True]

See :mod:`tracerl.sampling.generate` for the conventions (block alignment, budget,
post-EOS positions, steps, determinism) shared with the trainer.
"""

from tracerl.sampling.generate import (
    SamplingConfig,
    Trajectory,
    check_prompts,
    decode_batch,
    generate,
    generate_batches,
    plan_batches,
    prompt_seeds,
)
from tracerl.sampling.policy import clear_policy_cache, load_policy
from tracerl.sampling.records import frame_to_trajectories, trajectories_to_frame
from tracerl.sampling.strategies import STRATEGIES, process_logits, transfer_schedule

__all__ = [
    "STRATEGIES", "SamplingConfig", "Trajectory", "check_prompts", "clear_policy_cache",
    "decode_batch", "frame_to_trajectories", "generate", "generate_batches", "load_policy",
    "plan_batches", "prompt_seeds", "process_logits",
    "trajectories_to_frame", "transfer_schedule",
]
