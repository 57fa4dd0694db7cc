"""Shared fixtures: tiny models built from config, the SDAR release layout, torch threads."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
SDAR_RELEASE = FIXTURES / "sdar-4b-chat-release"

# Tests run two at a time (pytest-xdist) on small machines: one thread each.
torch.set_num_threads(int(os.environ.get("TRACERL_TEST_THREADS", "1")))

# Prefect binds its console log handler to the stream stderr is at the moment it first
# configures logging. Configure it now, under the session's own capture: if a test using
# capsys were first, the handler would keep that test's stream, closed after it.
from prefect.logging.configuration import setup_logging  # noqa: E402

setup_logging()


@pytest.fixture(scope="session")
def default_tokenizer():
    from tracerl.models import build_default_tokenizer

    return build_default_tokenizer()


@pytest.fixture()
def tiny_sdar(default_tokenizer):
    """The tiny block-diffusion test model (2 layers, hidden 32, fp32) and its tokenizer."""
    from tracerl.models import build_for_tokenizer

    return build_for_tokenizer(default_tokenizer, "sdar", seed=0), default_tokenizer


def build_release_checkpoint(out: Path, *, layers: int = 2, hidden: int = 16, heads: int = 2,
                             kv_heads: int = 1, head_dim: int = 8, intermediate: int = 32,
                             seed: int = 0) -> Path:
    """A checkpoint folder laid out like the SDAR-4B-Chat / TraDo release.

    config.json of model_type ``sdar`` (auto_map and all, shrunk to a few layers), the real
    Qwen tokenizer files with ``<|MASK|>``, and random weights saved as two safetensors
    shards under the parameter names of the release's weight index.
    """
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for f in SDAR_RELEASE.iterdir():
        if f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, out / f.name)
    cfg = json.loads((SDAR_RELEASE / "config.json").read_text())
    cfg.update(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
               num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=intermediate,
               max_window_layers=layers)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    index = json.loads((SDAR_RELEASE / "model.safetensors.index.json").read_text())
    keep = {
        k: v for k, v in index["weight_map"].items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers
    }
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
    for name, shard in keep.items():
        part = name.split(".")[-2]
        shape = shapes[part]
        t = (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.05)
        shards.setdefault(shard, {})[name] = t.to(torch.bfloat16)
    for shard, tensors in shards.items():
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": keep}, indent=2))
    return out


@pytest.fixture()
def release_checkpoint(tmp_path):
    return build_release_checkpoint(tmp_path / "sdar-release")


REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def params_file(path: Path, **sections) -> Path:
    """Write the repository's params.yaml (every section stated, as loading requires) with
    ``sections`` merged over it key by key; returns ``path``."""
    import yaml

    raw = yaml.safe_load(REPO_PARAMS.read_text())
    for name, values in sections.items():
        raw[name].update(values)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
