"""Load a policy checkpoint once per process: in-process pipeline runs reuse the model.

The cache is keyed by the resolved folder, the modification times and sizes of its
files, and the load options, so a checkpoint rewritten in place is loaded again.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch

_CACHE: OrderedDict[tuple, tuple] = OrderedDict()
_MAX_ENTRIES = 2


def _fingerprint(folder: Path) -> tuple:
    return tuple(sorted(
        (p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir() if p.is_file()
    ))


def load_policy(source: str | os.PathLike, *, family: str | None = None,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                block_size: int | None = None):
    """``tracerl.models.load_model(source, ...)``, cached (at most two models kept).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode. Callers must not modify it.
    """
    from tracerl.models import load_model
    from tracerl.models.model import resolve_checkpoint

    folder = resolve_checkpoint(source).resolve()
    key = (str(folder), _fingerprint(folder), family, str(dtype), str(device), block_size)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    model, tok = load_model(folder, family=family, dtype=dtype, device=device,
                            block_size=block_size)
    model.eval()
    _CACHE[key] = (model, tok)
    while len(_CACHE) > _MAX_ENTRIES:
        _CACHE.popitem(last=False)
    return model, tok


def clear_policy_cache() -> None:
    _CACHE.clear()
