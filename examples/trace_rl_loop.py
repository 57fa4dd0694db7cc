"""TraceRL in one place: generate -> score -> policy update, in memory, on the tiny model.

    python examples/trace_rl_loop.py

The pipeline (``bash scripts/run.sh``) runs the same three steps with SFT first, artifacts
between stages, a curriculum and tracking; this file is the algorithm alone (TraceRL,
Wang et al. 2025, arXiv 2509.06949). The README's "Using the library" shows the lines
between the ``loop`` markers, and ``tests/test_example.py`` checks that they match.
"""

# [loop:start]
import numpy as np
import torch

from tracerl.data import generate_tasks, render_prompt
from tracerl.models import tiny_model, weights_digest
from tracerl.rewards import compute_group_advantages, score_math
from tracerl.rl import (
    PolicyConfig,
    TokenScorer,
    TrainConfig,
    Trainer,
    policy_update,
    sample_from_trajectory,
)
from tracerl.sampling import SamplingConfig, generate


def main(model=None, tokenizer=None, *, tasks: int = 4, group: int = 8, iterations: int = 2,
         seed: int = 0) -> dict[str, float]:
    # 1. A policy (default: the tiny block-diffusion model built from config) and a trainer.
    if model is None:
        model, tokenizer = tiny_model("sdar", seed=seed)
    trainer = Trainer(TokenScorer(model), TrainConfig(lr=1e-3, micro_batch=16, seed=seed))
    # 2. Tasks with verifiable answers; each prompt (token ids) repeated for a group.
    pool = generate_tasks("arithmetic", tasks, difficulty=0, seed=seed)
    prompts = [render_prompt(tokenizer, t.prompt) for t in pool for _ in range(group)]
    decoding = SamplingConfig(block_size=4, steps_per_block=4, max_tokens=16)
    rng = torch.Generator().manual_seed(seed)
    for it in range(iterations):
        # 3. Generate: every response with its trace (decode step and log-prob per token).
        trajs = generate(model, prompts, decoding, rng)
        policy_id = weights_digest(model)  # the weights that sampled
        # 4. Score: a correct answer earns 1 (cut off by the budget = wrong); stopping
        #    earns 0.1, so that an untrained model already has something to learn.
        texts = tokenizer.batch_decode([t.response_ids[: t.response_len] for t in trajs],
                                       skip_special_tokens=True)
        cut = np.array([t.finish_reason == "length" for t in trajs])
        correct = np.array([score_math(x, pool[i // group].answer, truncated=c).correct
                            for i, (x, c) in enumerate(zip(texts, cut))])
        rewards = correct + 0.1 * ~cut
        # 5. Group-normalised advantages per task; all-equal groups teach nothing: dropped.
        adv = compute_group_advantages(rewards, np.repeat(np.arange(tasks), group), correct,
                                       group_filter="zero_variance")
        # 6. Training samples: the trajectories as recorded (ids, steps, log-probs, block
        #    size) with their advantages; the trainer rebuilds each decoding state from them.
        samples = [sample_from_trajectory(t, advantage=a, policy_id=policy_id)
                   for t, a, keep in zip(trajs, adv.advantages, adv.kept) if keep]
        # 7. TraceRL update: each token trained in the block state it was unmasked from,
        #    with the clipped ratio objective (old log-probs = the recorded ones).
        metrics = policy_update(trainer, samples, PolicyConfig(eps=0.2))
        print(f"iteration {it}: reward {rewards.mean():.3f}, accuracy {correct.mean():.3f}, "
              f"trained on {len(samples)} responses, loss {metrics.get('loss', 0.0):.4f}")
    return metrics
# [loop:end]


if __name__ == "__main__":
    main()
