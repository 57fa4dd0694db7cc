"""Random-weight checkpoints in a real release's layout (tests, benchmarks, smoke runs).

A release folder holds ``config.json``, the tokenizer files and the weight index
(``model.safetensors.index.json``) but, for a test or a benchmark, no weights are needed:
:func:`random_release_checkpoint` copies the metadata, sets the shapes asked for, and
saves random weights under the index's parameter names in its shard files, so that
:func:`tracerl.models.load_model` reads it exactly as it reads the real release. The
project's fixture is SDAR-4B-Chat's metadata (``tests/fixtures/sdar-4b-chat-release``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def random_release_checkpoint(release: str | Path, out: str | Path, *, layers: int,
                              hidden: int, heads: int, kv_heads: int, head_dim: int,
                              intermediate: int, seed: int = 0,
                              dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write ``out``: ``release``'s config (shapes replaced), tokenizer files and weight
    index (layers beyond ``layers`` dropped), with random weights (``N(0, 0.05^2)``
    matrices, unit norms) in the index's shards. Returns ``out``.

    Args:
        release: a folder with ``config.json`` and ``model.safetensors.index.json`` of a
            Qwen3-layout model (``model.layers.N.self_attn.q_proj.weight`` ...).
        layers, hidden, heads, kv_heads, head_dim, intermediate: the shapes to build.
    """
    from safetensors.torch import save_file

    release, out = Path(release), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in release.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, out / f.name)
    cfg = json.loads((release / "config.json").read_text())
    cfg.update(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
               num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=intermediate,
               max_window_layers=layers)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    index = json.loads((release / "model.safetensors.index.json").read_text())
    keep = {k: v for k, v in index["weight_map"].items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    g = torch.Generator().manual_seed(seed)
    V, H, I = cfg["vocab_size"], hidden, intermediate  # noqa: E741
    shapes = {
        "embed_tokens": (V, H), "lm_head": (V, H), "norm": (H,), "input_layernorm": (H,),
        "post_attention_layernorm": (H,), "q_norm": (head_dim,), "k_norm": (head_dim,),
        "q_proj": (heads * head_dim, H), "k_proj": (kv_heads * head_dim, H),
        "v_proj": (kv_heads * head_dim, H), "o_proj": (H, heads * head_dim),
        "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I),
    }
    shards: dict[str, dict[str, torch.Tensor]] = {}
    total = 0
    for name, shard in keep.items():
        shape = shapes[name.split(".")[-2]]
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.05
        x = shards.setdefault(shard, {})[name] = t.to(dtype)
        total += x.numel() * x.element_size()
    for shard, tensors in shards.items():
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": keep}, indent=2))
    return out
