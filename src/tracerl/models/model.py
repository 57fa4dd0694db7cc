"""Diffusion language models behind one interface, built on transformers' own classes.

Families (selected by name; :data:`FAMILIES` lists them):

- ``sdar``: block diffusion (SDAR, TraDo). SDAR is Qwen3-dense with a block-diffusion
  attention mask supplied from outside (reference spec section 10), so it runs on
  transformers' ``Qwen3ForCausalLM`` fed a 4-D mask through SDPA, with no vendored
  modeling code and no ``trust_remote_code``. Logits at ``t`` predict the token at ``t``.
  A block model may also sit on a Qwen2 or Llama backbone (``config.json`` of our own
  checkpoints records ``tracerl_family`` next to the backbone's ``model_type``).
- ``llada``: full attention (LLaDA, Nie et al. 2025). A Llama-shaped network with
  bidirectional attention and its own mask token; weights are renamed from LLaDA's
  names to Llama's at load (:data:`LLADA_KEY_MAPPING`). No shift.
- ``dream``: full attention (Dream, Ye et al. 2025). Qwen2 weights, bidirectional
  attention, **shifted** prediction (logit ``t`` predicts token ``t+1``); the wrapper
  realigns it so that for every family ``logits[:, t]`` scores the token at ``t``.

Special token ids (mask, pad, stop) come from the tokenizer and the checkpoint's
configuration, never from literals.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import (
    AttentionInterface,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from tracerl.devices import on_host
from tracerl.limits import is_hub_id
from tracerl.models.masks import attention_bias
from tracerl.registry import Registry

ATTENTION = "tracerl_sdpa"


def _sdpa_native_gqa(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     is_causal=None, **kwargs):
    """SDPA with the explicit 4-D mask, using SDPA's own grouped-query attention on CPU.

    transformers passes ``enable_gqa`` to SDPA only when no mask is given (masked GQA falls
    back to the math kernel on CUDA); with a mask it materialises the repeated keys and
    values (``repeat_kv``), about a quarter of cached decoding time on CPU. On CPU the math
    kernel runs either way, so native GQA gives the same output without the copies.
    Everywhere else this defers to transformers' own SDPA path.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    if query.device.type != "cpu" or groups == 1 or attention_mask is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=False, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, _sdpa_native_gqa)


class ModelLoadError(ValueError):
    """A checkpoint or tokenizer cannot be used; the message says what and how to fix it."""


@dataclass(frozen=True)
class FamilySpec:
    """What distinguishes one dLLM family from another for the rest of tracerl."""

    name: str
    attention: Literal["block", "full"]
    shifted: bool  # logit t predicts token t+1 (Dream); realigned by DiffusionLM
    default_backbone: str  # qwen3 | qwen2 | llama


FAMILIES: Registry[FamilySpec] = Registry("model family")  # model.family
for _spec in (FamilySpec("sdar", "block", False, "qwen3"),
              FamilySpec("llada", "full", False, "llama"),
              FamilySpec("dream", "full", True, "qwen2")):
    FAMILIES.add(_spec.name, _spec)

BACKBONES: Registry[tuple[type[PretrainedConfig], type[PreTrainedModel]]] = Registry("backbone")
"""transformers classes by ``model_type``; chosen by the checkpoint's config.json (or the
family's default backbone), not by params."""
BACKBONES.add("qwen3", (Qwen3Config, Qwen3ForCausalLM))
BACKBONES.add("qwen2", (Qwen2Config, Qwen2ForCausalLM))
BACKBONES.add("llama", (LlamaConfig, LlamaForCausalLM))

# LLaDA (modeling_llada.py of GSAI-ML/LLaDA-8B-*) parameter names -> Llama's.
# ``ff_proj`` is the gated branch (act(ff_proj(x)) * up_proj(x)), ``ff_out`` projects down.
LLADA_KEY_MAPPING: dict[str, str] = {
    r"^model\.transformer\.wte\.": "model.embed_tokens.",
    r"^model\.transformer\.ln_f\.": "model.norm.",
    r"^model\.transformer\.ff_out\.": "lm_head.",
    r"^model\.transformer\.blocks\.(\d+)\.q_proj\.": r"model.layers.\1.self_attn.q_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.k_proj\.": r"model.layers.\1.self_attn.k_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.v_proj\.": r"model.layers.\1.self_attn.v_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.attn_out\.": r"model.layers.\1.self_attn.o_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.ff_proj\.": r"model.layers.\1.mlp.gate_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.up_proj\.": r"model.layers.\1.mlp.up_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.ff_out\.": r"model.layers.\1.mlp.down_proj.",
    r"^model\.transformer\.blocks\.(\d+)\.attn_norm\.": r"model.layers.\1.input_layernorm.",
    r"^model\.transformer\.blocks\.(\d+)\.ff_norm\.": r"model.layers.\1.post_attention_layernorm.",
}


def rename_llada_key(name: str) -> str:
    """Map one LLaDA parameter name to the Llama name (unchanged if no rule matches)."""
    for pattern, repl in LLADA_KEY_MAPPING.items():
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids the sampler and trainer need.

    ``stop_ids`` end a response (the chat end-of-turn token and the tokenizer's EOS).
    """

    mask_id: int
    pad_id: int
    stop_ids: tuple[int, ...]

    @property
    def eos_id(self) -> int:
        return self.stop_ids[0]


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T', V] (T' = kept positions)
    hidden: torch.Tensor | None  # [B, T, H] final hidden states (when asked)


class DiffusionLM(nn.Module):
    """A diffusion LM: a transformers causal-LM backbone run with explicit 4-D masks.

    Args:
        backbone: a ``*ForCausalLM`` of transformers (Qwen3, Qwen2 or Llama).
        family: the :class:`FamilySpec`.
        tokens: special token ids.
        block_size: the block size the model was trained with (block families).
    """

    def __init__(self, backbone: PreTrainedModel, family: FamilySpec, tokens: SpecialTokens,
                 block_size: int | None = None):
        super().__init__()
        if backbone.config._attn_implementation not in ("sdpa", ATTENTION):
            raise ModelLoadError(
                f"attention implementation {backbone.config._attn_implementation!r} is not "
                "supported: tracerl feeds explicit 4-D masks, which it requires SDPA for "
                "(eager adds bool masks as 0/1). Load with attn_implementation='sdpa'."
            )
        self.backbone = backbone
        self.family = family
        self.tokens = tokens
        self.block_size = block_size
        if family.attention == "block" and not block_size:
            raise ModelLoadError("a block-diffusion model needs a block_size")

    @property
    def config(self) -> PretrainedConfig:
        return self.backbone.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def compute_dtype(self) -> torch.dtype:
        """The dtype attention runs in (the autocast dtype under autocast)."""
        dev = self.device.type
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        return self.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        visible: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        keep: torch.Tensor | slice | None = None,
        return_logits: bool = True,
        return_hidden: bool = False,
    ) -> ModelOutput:
        """Run the model.

        Args:
            input_ids: ``[B, T]``.
            visible: ``[B, T, K]`` bool visibility (``K`` = cached + ``T`` keys), True where a
                query may attend; built by :mod:`tracerl.models.masks`. It is turned into an
                additive float mask in the compute dtype here, so no bool mask ever reaches
                an attention kernel. None = full attention over ``input_ids``.
            position_ids: ``[B, T]`` absolute positions (default ``0..T-1``).
            cache: a :class:`~tracerl.models.cache.BlockKVCache` (or None).
            keep: positions (index or slice along T) to compute logits for; all if None.
            return_logits / return_hidden: what to return.

        Returns:
            :class:`ModelOutput`; ``logits[:, t]`` scores the token at ``t`` (Dream's shift
            is undone here: for shifted families, position 0 reuses its own logit).
        """
        bsz, t = input_ids.shape
        if visible is None:
            k = t + (cache.get_seq_length() if cache is not None else 0)
            visible = torch.ones(bsz, t, k, dtype=torch.bool, device=input_ids.device)
        if visible.dtype != torch.bool:
            raise TypeError("visible must be a bool tensor [B, T, K]; it is converted here")
        mask = attention_bias(visible, self.compute_dtype())
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device).expand(bsz, -1)
        out = self.backbone.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=False,
        )
        hidden = out.last_hidden_state
        logits = None
        if return_logits:
            h = hidden
            if self.family.shifted:
                # logit at t predicts t+1: realign so position t reads the logit of t-1
                h = torch.cat([hidden[:, :1], hidden[:, :-1]], dim=1)
            if keep is not None:
                h = h[:, keep]
            logits = self.backbone.lm_head(h)
        return ModelOutput(logits=logits, hidden=hidden if return_hidden else None)


# --------------------------------------------------------------------------- loading

_CONFIG_DROP = {
    "auto_map", "architectures", "model_type", "attn_implementation", "fuse_cross_entropy",
    "debug", "micro_forward", "skip_checkpoint", "use_deepep", "ep_size", "transformers_version",
    "torch_dtype", "dtype", "tracerl_family", "tracerl_backbone",
}

CHECKPOINT_SUBDIRS = ("checkpoint", "model")
"""Where a stage folder keeps its model (``save_model(..., stage_dir / "checkpoint")``)."""


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """The model folder of ``path``: itself, or its ``checkpoint/`` (or ``model/``) subfolder
    when ``path`` is a stage folder. The one place that knows this layout.

    Example:
        >>> checkpoint_dir("/no/such/folder").as_posix()
        '/no/such/folder'
    """
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        for sub in CHECKPOINT_SUBDIRS:
            if (path / sub / "config.json").is_file():
                return path / sub
    return path


def resolve_checkpoint(source: str | os.PathLike, revision: str | None = None) -> Path:
    """A local checkpoint folder for ``source``: a checkpoint folder, a stage folder holding
    one (:func:`checkpoint_dir`), or a hub id fetched to the cache.

    Raises:
        ModelLoadError: the folder does not exist and ``source`` is not a fetchable hub id.
    """
    path = checkpoint_dir(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json: not a model checkpoint folder")
        return path
    text = str(source)
    if path.exists():
        raise ModelLoadError(f"{path} is a file; pass the checkpoint folder that holds it")
    if is_hub_id(text):
        try:
            from huggingface_hub import snapshot_download

            local = snapshot_download(
                repo_id=text,
                revision=revision,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja",
                                "tokenizer*", "merges.txt", "vocab.*"],
            )
        except Exception as e:  # offline, unknown repo, auth
            raise ModelLoadError(
                f"checkpoint {text!r} is neither a local folder nor a hub model that could be "
                f"fetched ({type(e).__name__}: {e}). Pass an existing local folder, or fetch the "
                "hub id once while online (HF_HUB_OFFLINE unset) so it is in the local cache."
            ) from e
        return Path(local)
    raise ModelLoadError(
        f"checkpoint folder not found: {text}. Pass a folder with config.json and "
        "*.safetensors, or a hub id like 'Gen-Verse/TraDo-4B-Instruct'."
    )


def detect_family(cfg: dict, family: str | None = None) -> tuple[FamilySpec, str]:
    """(family, backbone) of a checkpoint from its config.json dict."""
    mt = str(cfg.get("model_type", "")).lower()
    name = family or cfg.get("tracerl_family")
    if name is None:
        if mt.startswith("sdar"):
            if "moe" in mt:
                raise ModelLoadError(
                    f"model_type {mt!r} (SDAR mixture-of-experts) is not supported; "
                    "use a dense SDAR/TraDo checkpoint"
                )
            name = "sdar"
        elif mt.startswith("llada"):
            name = "llada"
        elif mt == "dream":
            name = "dream"
        elif mt in BACKBONES:
            raise ModelLoadError(
                f"config.json has model_type {mt!r}, an autoregressive architecture with no "
                "diffusion family recorded. Pass family='sdar' (block diffusion), 'llada' or "
                "'dream' to load it as a diffusion LM."
            )
        else:
            raise ModelLoadError(
                f"unknown model family for model_type {mt!r}; supported families: "
                f"{', '.join(FAMILIES)} (model_type sdar, llada, dream, or qwen3/qwen2/llama "
                "with family=...)"
            )
    if name not in FAMILIES:
        raise ModelLoadError(FAMILIES.problem(name, "model family"))
    spec = FAMILIES[name]
    backbone = cfg.get("tracerl_backbone") or (mt if mt in BACKBONES else spec.default_backbone)
    return spec, backbone


def _llada_config(cfg: dict) -> dict:
    """LLaDA config.json keys -> Llama config keys."""
    return {
        "vocab_size": cfg.get("embedding_size") or cfg["vocab_size"],
        "hidden_size": cfg["d_model"],
        "intermediate_size": cfg["mlp_hidden_size"],
        "num_hidden_layers": cfg["n_layers"],
        "num_attention_heads": cfg["n_heads"],
        "num_key_value_heads": cfg.get("n_kv_heads") or cfg["n_heads"],
        "max_position_embeddings": cfg.get("max_sequence_length", 4096),
        "rms_norm_eps": cfg.get("rms_norm_eps", 1e-5),
        "rope_theta": cfg.get("rope_theta", 10000.0),
        "tie_word_embeddings": bool(cfg.get("weight_tying", False)),
        "attention_bias": bool(cfg.get("include_bias", False)),
        "mlp_bias": False,
        "hidden_act": "silu",
        "mask_token_id": cfg.get("mask_token_id"),
        "pad_token_id": cfg.get("pad_token_id"),
        "eos_token_id": cfg.get("eos_token_id"),
    }


def backbone_config(cfg: dict, spec: FamilySpec, backbone: str) -> PretrainedConfig:
    """Build the transformers config of the backbone from a checkpoint's config.json."""
    raw = _llada_config(cfg) if spec.name == "llada" and "d_model" in cfg else dict(cfg)
    kwargs = {k: v for k, v in raw.items() if k not in _CONFIG_DROP}
    config_cls, _ = BACKBONES[backbone]
    config = config_cls(**kwargs)
    config._attn_implementation = ATTENTION
    return config


def special_tokens(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig,
                   generation_config: dict | None = None) -> SpecialTokens:
    """Mask, pad and stop ids from the tokenizer, the config and generation_config.json.

    Raises:
        ModelLoadError: no mask token anywhere.
    """
    mask_id = tokenizer.mask_token_id
    if mask_id is None:
        mask_id = getattr(config, "mask_token_id", None)
    if mask_id is None:
        raise ModelLoadError(
            "the tokenizer has no mask token and config.json has no mask_token_id. A diffusion "
            "LM needs one: add it with tokenizer.add_special_tokens({'mask_token': '<|MASK|>'}) "
            "(and resize the embeddings), or set mask_token_id in config.json."
        )
    stop: list[int] = []
    gen_eos = (generation_config or {}).get("eos_token_id")
    for src in (gen_eos, tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        for i in ([src] if isinstance(src, int) else list(src or [])):
            if i is not None and i not in stop:
                stop.append(int(i))
    if not stop:
        raise ModelLoadError("no EOS token in the tokenizer, config or generation_config.json")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = getattr(config, "pad_token_id", None)
    if pad_id is None:
        pad_id = stop[-1]
    if mask_id in stop:
        raise ModelLoadError(f"mask token id {mask_id} is also a stop token; fix the tokenizer")
    return SpecialTokens(mask_id=int(mask_id), pad_id=int(pad_id), stop_ids=tuple(stop))


def load_tokenizer(folder: str | os.PathLike) -> PreTrainedTokenizerBase:
    folder = Path(folder)
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        if (folder / "tokenizer.json").is_file():
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
        raise ModelLoadError(
            f"no loadable tokenizer in {folder} ({type(e).__name__}: {e}); the folder needs "
            "tokenizer.json or vocab/merges files with tokenizer_config.json"
        ) from e


@on_host  # loaded on the host, then moved to ``device``
def load_model(
    source: str | os.PathLike,
    *,
    family: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    block_size: int | None = None,
) -> tuple[DiffusionLM, PreTrainedTokenizerBase]:
    """Load a diffusion LM and its tokenizer from a folder or hub id, offline-capable.

    Real SDAR/TraDo releases (``model_type: sdar``) load without ``trust_remote_code``:
    their weights use Qwen3's parameter names. Our own checkpoints (see :func:`save_model`)
    are plain transformers checkpoints that ``AutoModelForCausalLM`` also reloads.

    Args:
        source: checkpoint folder or hub id.
        family: override the detected family (``sdar``, ``llada``, ``dream``).
        dtype: parameter dtype (float32 or bfloat16; never float16 on CPU).
        block_size: override the block size recorded in config.json.

    Raises:
        ModelLoadError: missing folder, unknown family, no mask token, bad files.
    """
    folder = resolve_checkpoint(source, revision)
    cfg = json.loads((folder / "config.json").read_text())
    spec, backbone = detect_family(cfg, family)
    config = backbone_config(cfg, spec, backbone)
    tokenizer = load_tokenizer(folder)
    gen_path = folder / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else None
    tokens = special_tokens(tokenizer, config, gen)
    weights = list(folder.glob("*.safetensors")) + list(folder.glob("*.bin"))
    if not weights:
        raise ModelLoadError(f"{folder} holds no weights (*.safetensors)")
    _, model_cls = BACKBONES[backbone]
    kwargs = {}
    if spec.name == "llada" and "d_model" in cfg:
        kwargs["key_mapping"] = LLADA_KEY_MAPPING
    try:
        hf = model_cls.from_pretrained(
            str(folder), config=config, dtype=dtype, attn_implementation=ATTENTION, **kwargs
        )
    except Exception as e:
        raise ModelLoadError(f"could not load weights from {folder}: {type(e).__name__}: {e}") from e
    hf.to(device)
    bs = block_size or cfg.get("block_size") if spec.attention == "block" else None
    if spec.attention == "block" and not bs:
        raise ModelLoadError(
            f"{folder}/config.json has no block_size; pass block_size=... for a block model"
        )
    return DiffusionLM(hf, spec, tokens, bs), tokenizer


def weights_digest(module: nn.Module) -> str:
    """A short digest of a module's parameters: identifies the weights that sampled a rollout,
    so the trainer knows when recorded log-probs can stand in for a recomputation."""
    import hashlib

    from tracerl.models.lora import effective_state_dict

    h = hashlib.sha256()
    # an adapted model is digested as its merged weights (what its checkpoint holds)
    for name, p in sorted(effective_state_dict(module).items()):
        h.update(name.encode())
        h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def save_model(model: DiffusionLM, tokenizer: PreTrainedTokenizerBase | None,
               out_dir: str | os.PathLike) -> Path:
    """Save in transformers' format (safetensors + config.json + tokenizer files).

    config.json keeps the backbone's ``model_type`` (so ``AutoModelForCausalLM`` reloads the
    weights) and records ``tracerl_family``, ``tracerl_backbone``, ``block_size`` and
    ``mask_token_id`` for :func:`load_model`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.backbone.config
    cfg.tracerl_family = model.family.name
    cfg.tracerl_backbone = cfg.model_type
    cfg.mask_token_id = model.tokens.mask_id
    if model.block_size:
        cfg.block_size = model.block_size
    model.backbone.save_pretrained(str(out), safe_serialization=True)
    gen = {"eos_token_id": list(model.tokens.stop_ids), "pad_token_id": model.tokens.pad_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
