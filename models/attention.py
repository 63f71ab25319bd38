"""Attention modules of the UNet and the MM-DiT, and the one hook through which Prompt-to-Prompt edits enter.

Two modules of the UNet share one attention core:
- `CrossAttention` (Stable Diffusion, CompVis `ldm/modules/attention.py`): queries from pixels,
  keys/values from the context (text for `attn2`, the pixels themselves for `attn1`).
- `HybridAttention` (Imagen, Saharia et al. 2022, App. F; lucidrains imagen-pytorch): self-attention
  whose keys/values get the text tokens' keys/values concatenated in front of the pixels' ones,
  so one softmax spans text and pixels. Columns `[0, num_text_keys)` of its map are text.

A third, `JointAttention` (Esser et al. 2024, SD3 §5.1; FLUX.1), is the MM-DiT's: text and image tokens
both query and both answer, in one softmax over `[text | image]` (text first, as the SD3 reference code and
FLUX do). Its map has four blocks: rows/columns `[0, num_text_keys)` are text, the rest image.

The hook (../shared/STYLE.md, "The one hook"): when a controller is attached and `wants` the site,
the module computes `probs = softmax(q kᵀ · scale)` in float32, shaped `(batch, heads, queries, keys)`,
hands it to the controller and uses what comes back as the map. At a joint site the controller may ask (`JointRequest`)
for the map in slices of query rows, so that SD3's multi-GB joint map is never held whole, and for the logits
instead of the probabilities (edits that copy logits and re-normalise). Every other layer keeps the fused
`F.scaled_dot_product_attention`. Sites are named by their `state_dict` prefix inside the UNet.

References: Vaswani et al. 2017 (Eq. 1), Hertz et al. 2022 (Prompt-to-Prompt, §3.2).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass(frozen=True)
class AttentionSite:
    """Where an attention map comes from; what a controller needs to decide what to do with it."""

    name: str  # state_dict prefix inside the network, e.g. "input_blocks.1.1.transformer_blocks.0.attn2" (UNet)
    #            or "joint_blocks.3" (MM-DiT: the block that owns the joint attention)
    kind: str  # "self" (pixels → pixels), "cross" (pixels → text), "hybrid" (pixels → text + pixels)
    #            or "joint" (text + pixels → text + pixels, MM-DiT)
    query_hw: tuple[int, int]  # spatial size (height, width) of the query grid (image tokens) at this layer
    num_text_keys: int  # how many key columns are text tokens: 0 for self, all for cross, the first n for hybrid/joint
    # Joint sites only (defaults keep the UNet's sites unchanged):
    num_text_queries: int = 0  # how many query rows come first and are text (joint: == num_text_keys)
    text_segments: tuple[tuple[str, int, int], ...] = ()  # (encoder, start, stop) ranges of the text columns,
    #   e.g. (("clip", 0, 77), ("t5", 77, 333)) for SD3, (("t5", 0, 512),) for FLUX-dev
    query_rows: tuple[int, int] | None = None  # joint sites handed over in slices (`JointRequest`): the query rows
    #   [start, stop) of this call; None in `wants` and when the whole map comes at once

    @property
    def num_queries(self) -> int:
        return self.query_hw[0] * self.query_hw[1] + self.num_text_queries

    @property
    def rows(self) -> tuple[int, int]:
        """The query rows this call's map holds: `query_rows`, or all of them."""
        return self.query_rows if self.query_rows is not None else (0, self.num_queries)


@dataclass(frozen=True)
class JointRequest:
    """How a controller wants a joint site's map handed over: its optional `joint_request(site)` returns one
    (a controller without that method gets the whole map of probabilities in one call).

    A joint map of SD3 at 1024 px is (batch, 24 heads, 4429, 4429): 7.5 GB in float32 for one prompt pair.
    Every P2P edit works row by row, so a controller can take it in slices of query rows and the full map is
    never held. `scores=True` hands over the logits `q kᵀ · scale` instead (float32), for edits that copy
    logits and re-normalise; the controller then returns probabilities.
    """

    query_chunk: int | None = None  # query rows per call; None: all rows in one call
    scores: bool = False  # hand over logits instead of probabilities (the controller returns probabilities)
    conditional_half: int | None = None  # n: a batch of 2·n rows is [uncond × n; cond × n] (classifier-free
    #   guidance) and only its last n rows reach the controller; the first n take the fused path


class AttentionController(Protocol):
    """What the attention modules call. Implementations live in `p2p/controllers.py` and `p2p/joint.py`.

    A controller may also define `joint_request(site) -> JointRequest`: how a joint site hands it the map
    (slices of query rows, logits); without it a joint site hands over the whole map of probabilities."""

    def wants(self, site: AttentionSite) -> bool:
        """True if this layer's map must be materialised now (otherwise the fused path runs)."""

    def __call__(self, probs: torch.Tensor, site: AttentionSite) -> torch.Tensor:
        """Receive `probs` (batch, heads, queries, keys) in float32; return the map to use."""


class _Attention(nn.Module):
    """Shared core: multi-head attention with an optional controller at exactly one point."""

    kind = "self"

    def __init__(self, *, query_dim: int, heads: int, dim_head: int, upcast: bool = False):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.upcast = upcast  # SD 2.x computes attention in float32 (model config, not visible in weights)
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        # to_out.1 is dropout in the original; a parameterless Identity keeps the index "to_out.0".
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Identity())
        self.site_name = ""  # set by the UNet after construction: this module's state_dict prefix
        self.controller: AttentionController | None = None
        self.reached = False  # set when a forward pass met the attached controller

    def attend(self, q, k, v, *, query_hw: tuple[int, int], num_text_keys: int) -> torch.Tensor:
        """q: (b, n, h·d), k/v: (b, m, h·d) → (b, n, h·d)."""
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        controller = self.controller
        site = None
        if controller is not None:
            self.reached = True
            site = AttentionSite(self.site_name, self.kind, query_hw, num_text_keys)
        if site is not None and controller.wants(site):
            scale = q.shape[-1] ** -0.5
            scores = torch.einsum("b h i d, b h j d -> b h i j", q.float(), k.float()) * scale
            probs = controller(scores.softmax(dim=-1), site)  # the one hook
            out = torch.einsum("b h i j, b h j d -> b h i d", probs.to(v.dtype), v)
        elif self.upcast and q.dtype in (torch.float16, torch.bfloat16):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class CrossAttention(_Attention):
    """SD's attention: self-attention when `context` is None (`attn1`), cross-attention otherwise (`attn2`)."""

    def __init__(
        self, *, query_dim: int, context_dim: int | None = None, heads: int, dim_head: int, upcast: bool = False
    ):
        super().__init__(query_dim=query_dim, heads=heads, dim_head=dim_head, upcast=upcast)
        self.is_cross = context_dim is not None
        self.kind = "cross" if self.is_cross else "self"
        context_dim = context_dim if self.is_cross else query_dim
        self.to_k = nn.Linear(context_dim, heads * dim_head, bias=False)
        self.to_v = nn.Linear(context_dim, heads * dim_head, bias=False)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, *, query_hw: tuple[int, int]
    ) -> torch.Tensor:
        source = context if self.is_cross else x
        num_text_keys = source.shape[1] if self.is_cross else 0
        return self.attend(
            self.to_q(x), self.to_k(source), self.to_v(source), query_hw=query_hw, num_text_keys=num_text_keys
        )


class HybridAttention(_Attention):
    """Imagen's attention: text keys/values (`add_k_proj`, `add_v_proj`) concatenated before the pixels'.

    Key layout of the map: `[text tokens | pixels]`. With zero text tokens it is plain self-attention.
    The projection names follow diffusers' `Attention(added_kv_proj_dim=...)`.
    """

    kind = "hybrid"

    def __init__(self, *, query_dim: int, context_dim: int, heads: int, dim_head: int, upcast: bool = False):
        super().__init__(query_dim=query_dim, heads=heads, dim_head=dim_head, upcast=upcast)
        self.to_k = nn.Linear(query_dim, heads * dim_head, bias=False)
        self.to_v = nn.Linear(query_dim, heads * dim_head, bias=False)
        self.add_k_proj = nn.Linear(context_dim, heads * dim_head, bias=False)
        self.add_v_proj = nn.Linear(context_dim, heads * dim_head, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor, *, query_hw: tuple[int, int]) -> torch.Tensor:
        k = torch.cat([self.add_k_proj(context), self.to_k(x)], dim=1)  # (b, text + pixels, h·d)
        v = torch.cat([self.add_v_proj(context), self.to_v(x)], dim=1)
        return self.attend(self.to_q(x), k, v, query_hw=query_hw, num_text_keys=context.shape[1])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) · weight over the last axis, computed in float32 (Zhang & Sennrich 2019)."""
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of the head dimension (Su et al. 2021, RoFormer Eq. 34; BFL `apply_rope`).

    x: (b, h, n, d); rope: (b or 1, 1, n, d/2, 2, 2) rotation matrices (`models.flux.position_rotations`).
    """
    pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)  # (b, h, n, d/2, 1, 2)
    rotated = rope[..., 0] * pairs[..., 0] + rope[..., 1] * pairs[..., 1]  # (b, h, n, d/2, 2)
    return rotated.reshape(x.shape).to(x.dtype)


class JointAttention(nn.Module):
    """The MM-DiT's attention core, without parameters: the blocks own the projections (their checkpoint names
    differ: SD3 `attn.qkv`, FLUX `img_attn.qkv` / `linear1`) and hand over per-head q, k, v.

    Token order is `[text | image]` for queries, keys and values; the text length is read from the shapes
    (`num_text`), never assumed. `kind="self"` serves SD3.5-medium's image-only `attn2` (num_text = 0).
    The site is named by the module that owns this core (`joint_blocks.3`, `single_blocks.7`,
    `joint_blocks.0.x_block.attn2`): the nearest state_dict prefix.
    """

    def __init__(self, *, kind: str = "joint"):
        super().__init__()
        self.kind = kind
        self.site_name = ""  # set by `name_attention_sites`
        self.controller: AttentionController | None = None
        self.reached = False

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        num_text: int,
        query_hw: tuple[int, int],
        text_segments: tuple[tuple[str, int, int], ...] = (),
        rope: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q, k, v: (b, h, num_text + H·W, d), QK-normed already → (b, num_text + H·W, h·d)."""
        if rope is not None:  # FLUX: positions enter as rotations of q and k, before the map
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        controller = self.controller
        site = None
        if controller is not None:
            self.reached = True
            site = AttentionSite(
                self.site_name, self.kind, query_hw, num_text, num_text_queries=num_text, text_segments=text_segments
            )
        if site is not None and controller.wants(site):
            out = _controlled_joint(q, k, v, controller=controller, site=site)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return rearrange(out, "b h n d -> b n (h d)")


def _controlled_joint(q, k, v, *, controller: AttentionController, site: AttentionSite) -> torch.Tensor:
    """The hook of a joint site: the map in slices of query rows if the controller asks (`JointRequest`)."""
    request = controller.joint_request(site) if hasattr(controller, "joint_request") else JointRequest()
    half = request.conditional_half
    if half and q.shape[0] == 2 * half:  # the unconditional rows are nobody's business: fused attention
        fused = F.scaled_dot_product_attention(q[:half], k[:half], v[:half])
        return torch.cat([fused, _controlled_rows(q[half:], k[half:], v[half:], request, controller, site)])
    return _controlled_rows(q, k, v, request, controller, site)


def _controlled_rows(q, k, v, request: JointRequest, controller: AttentionController, site: AttentionSite):
    """The explicit map of q against k, in slices of `request.query_chunk` query rows, through the controller."""
    num_queries = q.shape[2]
    chunk = request.query_chunk or num_queries
    scale = q.shape[-1] ** -0.5
    outs = []
    for start in range(0, num_queries, chunk):
        stop = min(num_queries, start + chunk)
        scores = torch.einsum("b h i d, b h j d -> b h i j", q[:, :, start:stop].float(), k.float()) * scale
        part = dataclasses.replace(site, query_rows=(start, stop))
        probs = controller(scores if request.scores else scores.softmax(dim=-1), part)  # the one hook
        outs.append(torch.einsum("b h i j, b h j d -> b h i d", probs.to(v.dtype), v))
    return torch.cat(outs, dim=2)


def attention_modules(unet: nn.Module) -> dict[str, _Attention | JointAttention]:
    """Every attention site of a network, by site name: its state_dict prefix.

    A parameterless `JointAttention` core is named by its owner (`joint_blocks.3.attention` → `joint_blocks.3`).
    """
    sites = {}
    for name, m in unet.named_modules():
        if isinstance(m, JointAttention):
            sites[name.rsplit(".", 1)[0]] = m
        elif isinstance(m, _Attention):
            sites[name] = m
    return sites


def name_attention_sites(unet: nn.Module) -> None:
    """Give every attention module its state_dict prefix: one naming system for weights, hooks and maps."""
    for name, module in attention_modules(unet).items():
        module.site_name = name


@contextlib.contextmanager
def attach_controller(unet: nn.Module, controller: AttentionController | None) -> Iterator[None]:
    """Attach `controller` to every attention site for the duration of a run.

    On exit, if any forward pass ran, every site must have met the controller: a layer that silently
    bypassed it (another attention implementation, a wrapper) would make edits quietly incomplete.
    """
    modules = attention_modules(unet)
    if controller is None:
        yield
        return
    busy = [name for name, m in modules.items() if m.controller is not None]
    if busy:
        raise RuntimeError(
            f"a controller is already attached to {len(busy)} attention layers (e.g. {busy[0]!r}); "
            "controllers are built for one run: detach the old one first"
        )
    for m in modules.values():
        m.controller, m.reached = controller, False
    try:
        yield
        reached = [name for name, m in modules.items() if m.reached]
        if reached and len(reached) != len(modules):
            missed = sorted(set(modules) - set(reached))
            raise RuntimeError(
                f"the controller reached {len(reached)} of {len(modules)} attention layers; "
                f"never reached: {missed[:4]}{' …' if len(missed) > 4 else ''}"
            )
    finally:
        for m in modules.values():
            m.controller, m.reached = None, False
