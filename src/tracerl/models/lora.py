"""LoRA adapters on a diffusion LM, through peft (Hu et al. 2021, arXiv 2106.09685).

Low-rank adapters ``W + (alpha / r) * B @ A`` are injected in place into the backbone's
projection layers (``peft.inject_adapter_in_model``: the module tree of
:class:`~tracerl.models.DiffusionLM` stays as it is, so the sampler, the trainer and the
masks need no change); every other parameter is frozen, so the optimizer holds state
only for ``A`` and ``B`` (the memory point of LoRA: d1 fine-tunes LLaDA-8B with PEFT LoRA
r=128, NeMo-RL trains LLaDA with LoRA rank 128).

Checkpoints stay plain model checkpoints: :func:`merge_lora` folds each adapter into its
base weight (``W + delta``, with peft's own ``get_delta_weight``) and puts the plain
``nn.Linear`` back, so rollout and evaluate load the merged weights unchanged;
:func:`save_adapter` also writes the adapter alone in peft's folder layout
(``adapter_config.json`` + ``adapter_model.safetensors``) that ``PeftModel.from_pretrained``
and the hub take. :func:`effective_state_dict` gives the weights the adapted model
computes with, under the plain names and bit-equal to what :func:`merge_lora` writes, so
:func:`~tracerl.models.weights_digest` of an adapted model equals the digest of its merged
checkpoint (and, with fresh adapters, ``B = 0``, the digest of the weights it started from).

An adapter folder also records the digest of the base weights it was trained on
(``tracerl_base.json``): :func:`load_adapted` puts a saved adapter back on the same base
and trains on, so an RL run keeps one adapter on the frozen reference model, and the KL
reference is that model with the adapters switched off (:func:`adapters_disabled`): no
second copy of the weights in memory.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ADAPTER = "default"  # peft's adapter name; one adapter per model here
BASE_FILE = "tracerl_base.json"  # in an adapter folder: the digest of its base weights
PEFT_PREFIX = "base_model.model."  # PeftModel's key prefix in adapter_model.safetensors
PEFT_PIN = "peft==0.21.2"  # the version pinned in pyproject.toml (install hint only)

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The attention and MLP projections of the Qwen3 / Qwen2 / Llama backbones."""


@dataclass(frozen=True)
class LoraSpec:
    """LoRA settings (flat and typed; stage CLIs build it from ``<stage>.lora``).

    Args:
        rank: ``r``; 0 = off (full fine-tuning).
        alpha: scale numerator: the update is ``(alpha / rank) * B @ A``.
        dropout: dropout on the adapter's input while training.
        target_modules: leaf names of the ``nn.Linear`` layers that get adapters.
    """

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS

    @property
    def enabled(self) -> bool:
        return self.rank > 0


def spec_problems(spec: LoraSpec, where: str = "lora") -> list[str]:
    """Range problems of ``spec`` (those that need no model), one line each with the fix."""
    p = []
    if spec.rank < 0:
        p.append(f"{where}.rank must be >= 0 (0 = off, full fine-tuning), got {spec.rank}")
    if spec.alpha <= 0:
        p.append(f"{where}.alpha must be > 0 (the update is scaled by alpha / rank), "
                 f"got {spec.alpha}")
    if not 0 <= spec.dropout < 1:
        p.append(f"{where}.dropout must be in [0, 1), got {spec.dropout}")
    if not spec.target_modules:
        p.append(f"{where}.target_modules is empty: name the layers to adapt, e.g. "
                 f"[{', '.join(DEFAULT_TARGETS)}]")
    elif len(set(spec.target_modules)) != len(spec.target_modules):
        p.append(f"{where}.target_modules lists a name twice: {list(spec.target_modules)}")
    if spec.enabled and not peft_available():
        p.append(f"{where}.rank > 0 needs the peft package, which is not installed: "
                 f"`pip install {PEFT_PIN}` (a dependency of tracerl), or set {where}.rank: 0")
    return p


def peft_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("peft") is not None


def adaptable_names(backbone: nn.Module) -> list[str]:
    """Leaf names of the ``nn.Linear`` layers of the transformer (not ``lm_head``, which
    is tied to the embeddings in the Qwen3 releases): the valid ``target_modules``."""
    body = getattr(backbone, "model", backbone)
    return sorted({n.rsplit(".", 1)[-1] for n, m in body.named_modules()
                   if isinstance(m, nn.Linear) and n})


def target_problems(backbone: nn.Module, targets: Sequence[str], where: str = "lora") -> list[str]:
    """Targets that name no linear layer of ``backbone``, listed against the ones it has."""
    have = adaptable_names(backbone)
    unknown = [t for t in targets if t not in have]
    if not unknown:
        return []
    return [f"{where}.target_modules {unknown} name no linear layer of this "
            f"{type(backbone).__name__}; its layers are: {have}"]


def lora_layers(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` of every peft LoRA layer inside ``module`` (none without peft)."""
    if "peft" not in sys.modules:  # a model with adapters has imported it; don't pay the import
        return iter(())
    from peft.tuners.lora import LoraLayer

    return ((n, m) for n, m in module.named_modules() if isinstance(m, LoraLayer))


def has_lora(module: nn.Module) -> bool:
    return next(lora_layers(module), None) is not None


def apply_lora(lm, spec: LoraSpec, where: str = "lora"):
    """Inject fresh adapters (``B = 0``: the adapted model computes what ``lm`` did) into
    ``lm.backbone`` in place and freeze every other parameter. Returns ``lm``.

    Raises:
        ValueError: ``spec`` is invalid or names layers the model lacks (every problem listed).
    """
    problems = spec_problems(spec, where)
    if spec.enabled and not problems:
        problems += target_problems(lm.backbone, spec.target_modules, where)
    if not spec.enabled:
        problems.append(f"{where}.rank is 0: LoRA is off, nothing to apply")
    if has_lora(lm):
        problems.append("the model already has LoRA adapters: merge them first (merge_lora)")
    if problems:
        raise ValueError("LoRA: " + "; ".join(problems))
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                     target_modules=list(spec.target_modules), bias="none")
    inject_adapter_in_model(cfg, lm.backbone, adapter_name=ADAPTER)
    for n, p in lm.named_parameters():  # peft freezes the base; make sure of it
        p.requires_grad_(".lora_" in n)
    return lm


def _merged(weight: torch.Tensor, layer) -> torch.Tensor:
    """``weight`` plus the adapter's update (peft's ``get_delta_weight``, as its ``merge``
    adds it); ``weight`` itself while the update is zero (fresh adapters), so that a
    merge changes no bit, not even the sign of a zero."""
    delta = layer.get_delta_weight(ADAPTER).to(weight.dtype)
    return weight + delta if bool(delta.any()) else weight


@torch.no_grad()
def effective_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with each LoRA layer folded in: plain names, ``W + delta``
    (the tensors :func:`merge_lora` writes, bit for bit). The state dict itself when
    ``module`` has no adapters."""
    sd = module.state_dict()
    layers = dict(lora_layers(module))
    if not layers:
        return sd
    prefixes = {f"{n}.": layer for n, layer in layers.items()}
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        hit = next((p for p in prefixes if key.startswith(p)), None)
        if hit is None:
            out[key] = t
            continue
        rest = key[len(hit):]
        if rest.startswith("lora_"):
            continue
        if rest.startswith("base_layer."):
            rest = rest[len("base_layer."):]
            if rest == "weight":
                t = _merged(t, prefixes[hit])
        out[hit + rest] = t
    return out


@torch.no_grad()
def merge_lora(lm):
    """Fold every adapter into its base weight and put the plain layer back, in place.
    Returns ``lm``, now a plain model (what :func:`~tracerl.models.save_model` writes)."""
    for name, layer in list(lora_layers(lm)):
        base = layer.get_base_layer()
        base.weight.data = _merged(base.weight.data, layer)
        parent_name, _, child = name.rpartition(".")
        parent = lm.get_submodule(parent_name) if parent_name else lm
        setattr(parent, child, base)
    for p in lm.parameters():
        p.requires_grad_(True)
    return lm


def save_adapter(lm, out_dir: str | os.PathLike, spec: LoraSpec,
                 base_model: str | None = None, base_digest: str | None = None) -> Path:
    """Write the adapters in peft's layout (``adapter_config.json``,
    ``adapter_model.safetensors``): ``PeftModel.from_pretrained(<base backbone>, out_dir)``
    loads them onto the base weights they were trained from (``base_model``: its hub id or
    folder, recorded as ``base_model_name_or_path``; None when it has no stable name).
    ``base_digest`` (:func:`~tracerl.models.weights_digest` of those base weights) goes to
    ``tracerl_base.json``, which :func:`load_adapted` checks before it trains on."""
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                     target_modules=list(spec.target_modules), bias="none",
                     base_model_name_or_path=base_model, task_type="CAUSAL_LM")
    cfg.save_pretrained(str(out))
    # PeftModel keys carry its wrappers' prefix (PeftModel.base_model -> LoraModel.model)
    sd = {f"{PEFT_PREFIX}{k}": v.detach().to("cpu").contiguous()
          for k, v in get_peft_model_state_dict(lm.backbone, adapter_name=ADAPTER).items()}
    save_file(sd, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    if base_digest is not None:
        (out / BASE_FILE).write_text(json.dumps({"base_digest": base_digest}) + "\n")
    return out


def adapter_base_digest(adapter_dir: str | os.PathLike) -> str | None:
    """The base-weights digest an adapter folder records (None: not recorded, or no folder)."""
    f = Path(adapter_dir) / BASE_FILE
    return json.loads(f.read_text()).get("base_digest") if f.is_file() else None


def adapter_matches(adapter_dir: str | os.PathLike, spec: LoraSpec) -> bool:
    """Whether the saved adapter has ``spec``'s shape and scale (rank, alpha, targets)."""
    f = Path(adapter_dir) / "adapter_config.json"
    if not f.is_file():
        return False
    cfg = json.loads(f.read_text())
    return (cfg.get("r") == spec.rank and float(cfg.get("lora_alpha", -1)) == spec.alpha
            and sorted(cfg.get("target_modules") or []) == sorted(spec.target_modules))


@torch.no_grad()
def load_adapter(lm, adapter_dir: str | os.PathLike) -> None:
    """Copy a saved adapter (:func:`save_adapter`) into ``lm``'s injected adapters.

    Raises:
        ValueError: the folder's tensors and the model's adapters do not correspond.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    sd = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    sd = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in sd.items()}
    want = get_peft_model_state_dict(lm.backbone, adapter_name=ADAPTER)
    if set(sd) != set(want) or any(sd[k].shape != want[k].shape for k in want):
        raise ValueError(f"LoRA: the adapter in {adapter_dir} does not fit this model's "
                         f"adapters ({len(sd)} tensors saved, {len(want)} expected)")
    set_peft_model_state_dict(lm.backbone, sd, adapter_name=ADAPTER)


@contextmanager
def adapters_disabled(lm) -> Iterator[None]:
    """Inside, ``lm`` computes with its base weights alone (every adapter switched off):
    the frozen reference model of a LoRA run, without a second copy in memory."""
    layers = [layer for _, layer in lora_layers(lm)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:  # peft's enable also makes the active adapter trainable again
            layer.enable_adapters(True)


@dataclass
class Adapted:
    """What :func:`load_adapted` built: the adapted model, and how."""

    model: object
    tokenizer: object
    continued: bool  # a saved adapter was loaded onto its base (not fresh adapters)
    base_is_reference: bool  # the base weights are the reference model's
    base_digest: str  # digest of the base weights (recorded with the adapter)


def load_adapted(policy_dir: str | os.PathLike, reference_dir: str | os.PathLike | None,
                 spec: LoraSpec, where: str = "lora", **load_kw) -> Adapted:
    """The model a LoRA update trains: adapters on frozen base weights.

    - ``policy_dir`` has an ``adapter/`` of ``spec``'s shape trained on the reference's
      weights (``tracerl_base.json``): the reference plus that adapter, trained on
      (the previous update's optimizer moments belong to it);
    - ``policy_dir`` is the reference's checkpoint itself (an RL run's first update):
      fresh adapters on it;
    - otherwise: fresh adapters on ``policy_dir``'s (merged) weights; the reference, if
      any, is then not the base.

    ``load_kw`` go to :func:`~tracerl.models.load_model` (family, dtype, device).
    """
    from tracerl.models.model import checkpoint_dir, load_model, weights_digest

    pol = checkpoint_dir(policy_dir)
    adapter = Path(policy_dir) / "adapter"
    ref = checkpoint_dir(reference_dir) if reference_dir is not None else None
    is_ref = ref is not None and pol.resolve() == ref.resolve()
    saved = (adapter_base_digest(adapter) if ref is not None and adapter_matches(adapter, spec)
             else None)
    if is_ref or saved is not None:
        model, tok = load_model(ref, **load_kw)
        digest = weights_digest(model)  # recorded with the adapter, checked next time
        if is_ref or saved == digest:
            apply_lora(model, spec, where)
            if saved == digest:
                load_adapter(model, adapter)
            return Adapted(model, tok, saved == digest, True, digest)
        del model  # the adapter was trained on other weights: start from the policy's
    model, tok = load_model(pol, **load_kw)
    digest = weights_digest(model)
    apply_lora(model, spec, where)
    return Adapted(model, tok, False, False, digest)


def parameter_report(module: nn.Module, optimizer: torch.optim.Optimizer | None = None
                     ) -> dict[str, float]:
    """Trainable and total parameter counts, and the bytes of the optimizer's state in
    this process (AdamW: two moments per trainable parameter, plus step counters): what
    LoRA saves. Under ZeRO each rank reports its own partition (about 1/ranks of it)."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    out = {"params/total": float(total), "params/trainable": float(trainable),
           "params/trainable_fraction": trainable / total if total else 0.0}
    if optimizer is not None:
        # DeepSpeed's ZeRO optimizer wraps the torch one (its state: this rank's partition)
        inner = getattr(optimizer, "optimizer", None)
        opt = inner if isinstance(inner, torch.optim.Optimizer) else optimizer
        size = 0
        for st in getattr(opt, "state", {}).values():
            for v in st.values():
                if torch.is_tensor(v):
                    size += v.numel() * v.element_size()
        out["optimizer/state_bytes"] = float(size)
    return out


def save_trained(lm, tokenizer, out_dir: str | os.PathLike, spec: LoraSpec,
                 base_model: str | None = None, base_digest: str | None = None) -> Path:
    """A training stage's model outputs in ``out_dir``: ``checkpoint/`` (the plain model, with
    any adapters merged: what rollout and evaluate load) and, with LoRA, ``adapter/``
    (:func:`save_adapter`). Merging leaves ``lm`` a plain model. Returns ``checkpoint/``."""
    from tracerl.models.model import save_model

    out = Path(out_dir)
    if has_lora(lm):
        save_adapter(lm, out / "adapter", spec, base_model, base_digest)
        merge_lora(lm)
    return save_model(lm, tokenizer, out / "checkpoint")
