"""Modules that score only the trained positions of a batch of rows.

The vocabulary of real dLLMs is ~152k tokens, so logits are computed only at the trained
positions (gathered across the batch), and the log-softmax runs in float32 even under
bf16 autocast (the reference runs it in bf16, spec 12.2.7). These are ``nn.Module`` s so
that DeepSpeed can wrap them as its engine's module.
"""

from __future__ import annotations

import torch
from torch import nn

from tracerl.models import DiffusionLM, ValueModel
from tracerl.models.masks import attention_bias


def final_hidden(lm: DiffusionLM, input_ids: torch.Tensor, visible: torch.Tensor,
                 position_ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states ``[B, N, H]``: :meth:`DiffusionLM.forward` without the logits.

    Calls the transformers backbone directly so that every module returns transformers'
    own output types (DeepSpeed ZeRO-3 hooks need outputs whose tensors they can find).
    """
    mask = attention_bias(visible, lm.compute_dtype())
    out = lm.backbone.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                            use_cache=False)
    return out.last_hidden_state


class TokenScorer(nn.Module):
    """``(logprobs [M], entropy [M])`` of the labels at the target positions of a batch."""

    def __init__(self, lm: DiffusionLM):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, visible: torch.Tensor, position_ids: torch.Tensor,
                target_row: torch.Tensor, target_col: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: input_ids, position_ids ``[B, N]``; visible ``[B, N, N]``; targets ``[M]``."""
        h = final_hidden(self.lm, input_ids, visible, position_ids)
        if self.lm.family.shifted:  # logit t-1 predicts token t (Dream); same as DiffusionLM
            h = torch.cat([h[:, :1], h[:, :-1]], dim=1)
        logits = self.lm.backbone.lm_head(h[target_row, target_col]).float()  # [M, V]
        logp = torch.log_softmax(logits, dim=-1)
        token_logp = logp.gather(-1, labels[:, None]).squeeze(-1)
        with torch.no_grad():
            entropy = -(logp.exp() * logp).sum(-1)
        return token_logp, entropy


class ValueScorer(nn.Module):
    """Values ``[M]`` at the target positions (the noisy position of each trained token)."""

    def __init__(self, value_model: ValueModel):
        super().__init__()
        self.vm = value_model

    def forward(self, input_ids: torch.Tensor, visible: torch.Tensor, position_ids: torch.Tensor,
                target_row: torch.Tensor, target_col: torch.Tensor, labels: torch.Tensor
                ) -> torch.Tensor:
        h = final_hidden(self.vm.lm, input_ids, visible, position_ids)[target_row, target_col]
        return self.vm.head(h).squeeze(-1).float()
