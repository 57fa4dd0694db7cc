"""Diffusion-LM families behind one interface (see :mod:`tracerl.models.model`)."""

from tracerl.models.cache import BlockKVCache
from tracerl.models.masks import (
    attention_bias,
    block_ids,
    block_visibility,
    full_visibility,
    training_layout,
)
from tracerl.models.model import (
    CHECKPOINT_SUBDIRS,
    FAMILIES,
    DiffusionLM,
    FamilySpec,
    ModelLoadError,
    SpecialTokens,
    checkpoint_dir,
    load_model,
    load_tokenizer,
    save_model,
    weights_digest,
)
from tracerl.models.tiny import build_for_tokenizer, build_model, tiny_model
from tracerl.models.tokenizer import build_default_tokenizer, save_default_tokenizer
from tracerl.models.value import ValueModel

__all__ = [
    "CHECKPOINT_SUBDIRS", "FAMILIES", "BlockKVCache", "DiffusionLM", "FamilySpec", "ModelLoadError", "SpecialTokens",
    "ValueModel", "attention_bias", "block_ids", "block_visibility", "build_default_tokenizer",
    "build_for_tokenizer", "build_model", "checkpoint_dir", "full_visibility", "load_model", "load_tokenizer",
    "save_default_tokenizer", "save_model", "tiny_model", "training_layout",
    "weights_digest",
]
