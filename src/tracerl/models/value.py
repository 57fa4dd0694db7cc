"""The diffusion value model: a policy-shaped backbone plus a scalar head.

As in TraceRL's value model (Wang et al. 2025, section 3.3; reference
``train/init_trado_value_model.py``): the same backbone as the policy, initialised from
it, with ``value_head = Linear(hidden, 1, bias=False)`` **zero-initialised**, so the
first values are 0 and the first advantages equal the returns. It reads the final hidden
state at every position and uses the same masks and layout as the policy.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tracerl.models.model import DiffusionLM, load_model, save_model

HEAD_FILE = "value_head.safetensors"


class ValueModel(nn.Module):
    """``V(x)[b, t]``: one scalar per position."""

    def __init__(self, lm: DiffusionLM):
        super().__init__()
        self.lm = lm
        self.head = nn.Linear(lm.config.hidden_size, 1, bias=False, dtype=lm.dtype,
                              device=lm.device)
        nn.init.zeros_(self.head.weight)

    @classmethod
    def from_policy(cls, policy: DiffusionLM) -> ValueModel:
        """A value model whose backbone is a copy of ``policy``'s, with a zero head."""
        return cls(copy.deepcopy(policy))

    def forward(self, input_ids: torch.Tensor, *, visible: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Values ``[B, T]`` (computed in float32 for a stable regression target)."""
        out = self.lm(input_ids, visible=visible, position_ids=position_ids,
                      return_logits=False, return_hidden=True)
        return self.head(out.hidden).squeeze(-1).float()

    def save(self, out_dir: str | os.PathLike, tokenizer=None) -> Path:
        out = save_model(self.lm, tokenizer, out_dir)
        save_file({"weight": self.head.weight.detach().contiguous()}, str(out / HEAD_FILE))
        (out / "value_config.json").write_text(json.dumps({"head": "linear_no_bias"}))
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> ValueModel:
        lm, _ = load_model(folder, dtype=dtype, device=device)
        vm = cls(lm)
        head = Path(folder) / HEAD_FILE
        if head.is_file():
            vm.head.weight.data.copy_(load_file(str(head))["weight"].to(dtype))
        return vm
