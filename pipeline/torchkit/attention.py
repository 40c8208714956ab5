"""``nn.MultiheadAttention`` with its packed Q/K/V projection split into three ``nn.Linear`` layers.

``quantize_dynamic`` swaps ``nn.Linear`` layers for INT8 ones, but ``nn.MultiheadAttention`` keeps its
query/key/value projections in one packed ``in_proj_weight`` tensor that it multiplies itself, so those
weights stay FP32 (and its ``out_proj`` is a Linear subclass that quantize_dynamic leaves alone).
:class:`SplitProjectionAttention` computes the same attention through ``q_proj``/``k_proj``/``v_proj``/
``out_proj`` Linear layers, which dynamic quantization then covers. torch's own
``torch.ao.nn.quantizable.MultiheadAttention`` was measured first and not used: with ``batch_first=True``
and more than one head it reshapes the heads' outputs without transposing them (wrong outputs), it keeps
an unused FP32 ``in_proj_weight``, and it refuses ``is_causal``.

The re-implementation covers ``batch_first`` or not, batched or unbatched inputs, ``kdim``/``vdim``,
``key_padding_mask`` and ``attn_mask`` (bool or additive float), ``need_weights`` with or without head
averaging, and dropout in training. ``add_bias_kv`` and ``add_zero_attn`` are refused
(:func:`unsupported`); the caller keeps those layers as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def unsupported(attention: nn.MultiheadAttention) -> str | None:
    """Why ``attention`` cannot be split (an option the re-implementation does not have), or None."""
    if attention.bias_k is not None or attention.bias_v is not None:
        return "add_bias_kv=True is not re-implemented with separate projections"
    if attention.add_zero_attn:
        return "add_zero_attn=True is not re-implemented with separate projections"
    return None


def additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A bool mask (True = not attended) as -inf where True; a float mask as it is; None stays None."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask.bool(), float("-inf"))


class SplitProjectionAttention(nn.Module):
    """Multi-head attention computed as ``nn.MultiheadAttention`` computes it, with one Linear per projection."""

    # nn.TransformerEncoderLayer takes its fused fast path, which reads the packed in_proj_weight, only when
    # in_proj_bias is set; None makes it call this module's forward instead.
    in_proj_bias = None

    def __init__(self, attention: nn.MultiheadAttention):
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = attention.embed_dim, attention.num_heads, attention.head_dim
        self.batch_first, self.dropout = attention.batch_first, attention.dropout
        self._qkv_same_embed_dim = attention._qkv_same_embed_dim
        bias = attention.in_proj_bias
        weights = attention.in_proj_weight.chunk(3) if attention._qkv_same_embed_dim else (
            attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight)
        biases = bias.chunk(3) if bias is not None else (None, None, None)
        self.q_proj, self.k_proj, self.v_proj = (self.linear(weight, part) for weight, part in zip(weights, biases))
        self.out_proj = self.linear(attention.out_proj.weight, attention.out_proj.bias)
        self.train(attention.training)

    @staticmethod
    def linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
        """A plain ``nn.Linear`` holding a copy of ``weight`` and ``bias``."""
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None, need_weights: bool = True,
        attn_mask: Tensor | None = None, average_attn_weights: bool = True, is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """``nn.MultiheadAttention.forward``; ``is_causal`` is a hint there too: ``attn_mask`` holds the causal mask."""
        batched = query.dim() == 3
        if not batched:
            query, key, value = (x.unsqueeze(0 if self.batch_first else 1) for x in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        if self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        target, batch, _ = query.shape
        source = key.shape[0]
        heads = batch * self.num_heads
        q = self.q_proj(query).reshape(target, heads, self.head_dim).transpose(0, 1)
        k = self.k_proj(key).reshape(source, heads, self.head_dim).transpose(0, 1)
        v = self.v_proj(value).reshape(source, heads, self.head_dim).transpose(0, 1)
        scores = torch.bmm(q * self.head_dim**-0.5, k.transpose(1, 2))
        mask = additive_mask(attn_mask, scores.dtype)
        if mask is not None:
            scores = scores + (mask.unsqueeze(0) if mask.dim() == 2 else mask)
        padding = additive_mask(key_padding_mask, scores.dtype)
        if padding is not None:
            scores = (scores.view(batch, self.num_heads, target, source) + padding[:, None, None, :]).view(heads, target, source)
        weights = F.dropout(F.softmax(scores, dim=-1), p=self.dropout, training=self.training)
        output = torch.bmm(weights, v).transpose(0, 1).reshape(target, batch, self.embed_dim)
        output = self.out_proj(output)
        if self.batch_first:
            output = output.transpose(0, 1)
        averaged = None
        if need_weights:
            averaged = weights.view(batch, self.num_heads, target, source)
            averaged = averaged.mean(dim=1) if average_attn_weights else averaged
        if not batched:
            output = output.squeeze(0 if self.batch_first else 1)
            averaged = None if averaged is None else averaged.squeeze(0)
        return output, averaged
