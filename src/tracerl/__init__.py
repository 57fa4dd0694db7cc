"""tracerl: TraceRL post-training for diffusion language models.

Library layout (everything that computes lives here; stages are thin CLIs, flows only
sequence stages):

- ``tracerl.models``: diffusion-LM families behind one interface, loading, value model.
- ``tracerl.sampling``: the rollout engine (block diffusion with a KV cache, trajectories).
- ``tracerl.rl``: trajectories -> training rows, TraceRL loss, GAE, value loss, trainer.
- ``tracerl.rewards``: math verification, sandboxed code execution, group advantages.
- ``tracerl.data``: task sources and typed task records.
- ``tracerl.curriculum``: next task pool and schedule from pass rates.
- ``tracerl.tracking``: MLflow adapter and a null tracker.
- ``tracerl.schemas``: versioned parquet schemas of stage artifacts.
"""

__version__ = "0.1.0"
