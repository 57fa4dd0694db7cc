"""Models built from a config, in well under a second, for tests and the embedded default."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from tracerl.devices import on_host
from tracerl.models.model import (
    ATTENTION,
    BACKBONES,
    FAMILIES,
    DiffusionLM,
    ModelLoadError,
    SpecialTokens,
    special_tokens,
)


@on_host  # initialised on the host: the same weights whatever the run's device
def build_model(
    family: str = "sdar",
    *,
    vocab_size: int,
    tokens: SpecialTokens,
    block_size: int | None = 4,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 64,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool = True,
    backbone: str | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> DiffusionLM:
    """A randomly initialised diffusion LM of ``family`` with the given sizes.

    The defaults are the tiny test model (2 layers, hidden 32).
    """
    if family not in FAMILIES:
        raise ModelLoadError(FAMILIES.problem(family, "model family"))
    spec = FAMILIES[family]
    backbone = backbone or spec.default_backbone
    config_cls, model_cls = BACKBONES[backbone]
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokens.pad_id,
        eos_token_id=list(tokens.stop_ids),
        bos_token_id=None,
        rope_theta=10000.0,
    )
    if backbone == "qwen3":
        kwargs["head_dim"] = hidden_size // num_heads
    config = config_cls(**kwargs)
    config.mask_token_id = tokens.mask_id
    config._attn_implementation = ATTENTION
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = model_cls(config)
    hf.to(dtype)
    hf.eval()
    return DiffusionLM(hf, spec, tokens, block_size if spec.attention == "block" else None)


def build_for_tokenizer(tokenizer: PreTrainedTokenizerBase, family: str = "sdar",
                        **sizes) -> DiffusionLM:
    """:func:`build_model` with the vocabulary and special ids of ``tokenizer``."""
    from transformers import PretrainedConfig

    tokens = special_tokens(tokenizer, PretrainedConfig())
    return build_model(family, vocab_size=len(tokenizer), tokens=tokens, **sizes)


def tiny_model(family: str = "sdar", seed: int = 0, **sizes) -> tuple[DiffusionLM, PreTrainedTokenizerBase]:
    """The tiny test model (2 layers, hidden 32) with the default tokenizer."""
    from tracerl.models.tokenizer import build_default_tokenizer

    tok = build_default_tokenizer()
    return build_for_tokenizer(tok, family, seed=seed, **sizes), tok
