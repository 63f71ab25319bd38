"""Weights stored in one dtype, computed in another: each layer casts its weights inside its forward.

Half precision *computed* on a CPU without native bf16/fp16 matmul (no AVX512-BF16/AMX: most laptops and CI
machines) is 80-500× slower than fp32, so there half precision is for storage: `weights_dtype=fp16 dtype=fp32`
holds SDXL's 3.5 B parameters in ~7 GB and computes in fp32. Only the weights of the layer running at the moment
exist in fp32, never the whole model.

The mechanism, one for every model: `cast_weights_in_forward(module)` gives each Linear, Conv2d, GroupNorm,
LayerNorm (torch's and open_clip's) and MultiheadAttention a forward that casts its parameters to the dtype of
its input (`weight.to(x.dtype)`: no copy when they already agree, so fp32 models compute as before). The layers
change class to a subclass that only overrides `forward`, so parameter names, `state_dict` and `isinstance` stay
as they were. Layers that choose their compute dtype themselves are left alone: `GroupNorm32` (UNet, always fp32)
and embedding tables, whose looked-up rows the caller casts (`models/text.py`); so are parameters used outside a
layer's forward (the text encoders' `positional_embedding` and `text_projection`, cast where they are used).
"""

from __future__ import annotations

import open_clip.transformer
import torch
import torch.nn.functional as F
from torch import nn


def _cast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(dtype)


class CastingLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, _cast(self.weight, x.dtype), _cast(self.bias, x.dtype))


class CastingConv2d(nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, _cast(self.weight, x.dtype), _cast(self.bias, x.dtype))


class CastingGroupNorm(nn.GroupNorm):
    def forward(self, x):
        return F.group_norm(x, self.num_groups, _cast(self.weight, x.dtype), _cast(self.bias, x.dtype), self.eps)


class CastingLayerNorm(nn.LayerNorm):
    """Also replaces open_clip's `LayerNorm`, whose only difference (casting the output to the input's dtype)
    is a no-op when the weights already are in the input's dtype."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, _cast(self.weight, x.dtype), _cast(self.bias, x.dtype), self.eps)


class CastingMultiheadAttention(nn.MultiheadAttention):
    """The text encoders' attention (open_clip, batch-first, packed q/k/v): the functional core that
    `nn.MultiheadAttention.forward` calls, given the four parameters in the query's dtype."""

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        dtype = query.dtype
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))  # (n, b, d): the core's layout
        out, weights = F.multi_head_attention_forward(
            query,
            key,
            value,
            self.embed_dim,
            self.num_heads,
            _cast(self.in_proj_weight, dtype),
            _cast(self.in_proj_bias, dtype),
            self.bias_k,
            self.bias_v,
            self.add_zero_attn,
            self.dropout,
            _cast(self.out_proj.weight, dtype),
            _cast(self.out_proj.bias, dtype),
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        return (out.transpose(0, 1) if self.batch_first else out), weights


# exact types only: subclasses with their own dtype policy (GroupNorm32) or no forward of their own
# (MultiheadAttention's `out_proj`, a NonDynamicallyQuantizableLinear) keep theirs
CASTING_CLASSES: dict[type, type] = {
    nn.Linear: CastingLinear,
    nn.Conv2d: CastingConv2d,
    nn.GroupNorm: CastingGroupNorm,
    nn.LayerNorm: CastingLayerNorm,
    open_clip.transformer.LayerNorm: CastingLayerNorm,
    nn.MultiheadAttention: CastingMultiheadAttention,
}


def cast_weights_in_forward(module: nn.Module) -> nn.Module:
    """Give every layer of `module` a forward that casts its weights to its input's dtype (in place; idempotent)."""
    for layer in module.modules():
        casting = CASTING_CLASSES.get(type(layer))
        if casting is CastingMultiheadAttention and not layer._qkv_same_embed_dim:
            raise ValueError(f"{layer}: only packed q/k/v attention (open_clip's) is supported")
        if casting is not None:
            layer.__class__ = casting
    return module
