"""A preallocated key/value cache for block-diffusion decoding.

Block diffusion needs two kinds of forward over a cached prefix (reference spec 2.3):

- *denoise*: the current, partly masked block attends to the committed prefix and to
  itself; its keys/values must **not** be kept (the block changes every step);
- *commit*: the finished, clean block is run once more and its keys/values are appended.

transformers' attention layers call ``cache.update(k, v, layer_idx)`` and attend over what
it returns. :class:`BlockKVCache` writes the new keys/values into preallocated buffers at
the committed length and returns a view up to the end of them; only when ``store`` is
True does the committed length advance. A denoising step therefore costs no copy of the
prefix, and its scratch keys/values are simply overwritten by the next step, the scheme
of the reference engine (``jetengine_ext``), without paged memory.
"""

from __future__ import annotations

import torch


class BlockKVCache:
    """Per-layer key/value buffers ``[B, H_kv, capacity, D]`` shared by a decoding batch.

    Args:
        num_layers, batch_size, num_kv_heads, head_dim, capacity: buffer shape.
        dtype, device: of the buffers (the model's compute dtype).
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 capacity: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0  # committed tokens
        self.capacity = capacity
        self.store = True
        self._pending = 0  # tokens written by the current forward (same for all layers)

    @classmethod
    def for_model(cls, config, batch_size: int, capacity: int, dtype: torch.dtype,
                  device: torch.device | str = "cpu") -> BlockKVCache:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, batch_size, config.num_key_value_heads, head_dim,
                   capacity, dtype, device)

    # --- the protocol transformers' attention layers use -----------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        n = key_states.shape[-2]
        end = self.length + n
        if end > self.capacity:
            raise ValueError(
                f"KV cache overflow: {end} tokens > capacity {self.capacity}; "
                "allocate the cache for prompt + generation budget"
            )
        self.keys[layer_idx][:, :, self.length:end] = key_states
        self.values[layer_idx][:, :, self.length:end] = value_states
        self._pending = n
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    # --- what the sampler calls ---------------------------------------------------
    def begin(self, store: bool) -> BlockKVCache:
        """Set whether the next forward's keys/values are committed."""
        self.store = store
        self._pending = 0
        return self

    def end(self) -> None:
        """After a forward: advance the committed length if it was a storing forward."""
        if self.store:
            self.length += self._pending
        self._pending = 0

    def select(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (e.g. drop finished sequences)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
