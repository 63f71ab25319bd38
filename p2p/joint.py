"""Prompt-to-Prompt on the MM-DiT's joint attention (SD3 / SD3.5 / FLUX.1; P2P_SPEC §10).

One softmax over `[text | image]` queries and keys per head gives four blocks; the edit touches the conditional
half of the batch (SD3 has `[uncond; cond]`, FLUX-dev only a conditional batch), source first:
- image rows × text columns (P2P's cross-attention map): `Edit(M_src, M_tgt)` with the UNet's mappers (replace,
  refine, reweight, per-word windows) on the joint text columns, one block per token segment
  (`p2p.joint_tokens`; SD3: CLIP then T5, FLUX: T5);
- image rows × image columns (P2P's self-attention map): the source's during the self window;
- text rows × image columns (optional, `text_rows`): the source's rows for aligned text tokens, by the same
  mapper along the rows, during the cross window (the text stream is updated in every block, P2P_SPEC §10);
- text rows × text columns: never touched.
Replacing part of a softmax row breaks its sum (`renorm`): `probs` copies probabilities as they are (arXiv
2509.12888), `logits` copies logits and re-normalises the row (arXiv 2508.07519), `rescale` keeps the copied
part and scales the rest of the row so it sums to one. Block selection: `select_blocks`.

Memory: the editor asks for the map in slices of query rows (`models.attention.JointRequest`); every rule
above works row by row, so no full joint map is held.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from models.attention import AttentionSite, JointRequest
from models.errors import UserError
from models.flow_model import FlowModelConfig
from p2p.controllers import Controller, edit_columns

RENORM_MODES = ("probs", "logits", "rescale")
DEFAULT_QUERY_CHUNK = 1024  # query rows per slice: SD3 at 1024 px, 2 prompts, 24 heads → 4·24·1024·4429·4 B = 1.7 GB
BLOCK_GROUPS = ("all", "double", "single")  # SD3's blocks are all double-stream (text and image weights apart)


def block_of(site_name: str) -> str:
    """The block owning a site: 'joint_blocks.3.x_block.attn2' → 'joint_blocks.3' (SD3.5's image-only attention)."""
    return ".".join(site_name.split(".")[:2])


def model_blocks(config: FlowModelConfig) -> list[str]:
    """The transformer's blocks in forward order, from its config (no weights needed): SD3 `joint_blocks.i`;
    FLUX `double_blocks.i` then `single_blocks.i`."""
    if config.family == "sd3":
        return [f"joint_blocks.{i}" for i in range(config.mmdit.depth)]
    flux = config.flux
    return [f"double_blocks.{i}" for i in range(flux.depth)] + [
        f"single_blocks.{i}" for i in range(flux.depth_single_blocks)
    ]


def select_blocks(config: FlowModelConfig, blocks) -> frozenset[str]:
    """`blocks` → block names. 'all'; 'double' (SD3: every block; FLUX: its double-stream ones); 'single' (FLUX's
    single-stream ones); or a list of block indices in forward order (FLUX: doubles first, so 19 is FLUX-dev's
    first single block) and/or block names ('single_blocks.7')."""
    names = model_blocks(config)
    if isinstance(blocks, str):
        if blocks not in BLOCK_GROUPS:
            raise UserError(f"blocks={blocks!r} is unknown; use one of {BLOCK_GROUPS} or a list of block indices/names")
        chosen = [n for n in names if blocks == "all" or (blocks == "single") == n.startswith("single_blocks")]
        if not chosen:
            raise UserError(f"blocks={blocks!r}: this model has no such blocks ({names[0]} … {names[-1]})")
        return frozenset(chosen)
    if not isinstance(blocks, Sequence) or not blocks:
        raise UserError(f"blocks={blocks!r} must be 'all', 'double', 'single' or a non-empty list")
    chosen = []
    for b in blocks:
        if isinstance(b, int) and not isinstance(b, bool) and -len(names) <= b < len(names):
            chosen.append(names[b])
        elif isinstance(b, str) and b in names:
            chosen.append(b)
        else:
            raise UserError(f"block {b!r} is not one of this model's {len(names)} blocks (indices or {names[:2]} …)")
    return frozenset(chosen)


def conditional_rows(batch: int, num_prompts: int) -> slice:
    """The conditional half: `[uncond × P ; cond × P]` (SD3 with CFG) or the whole batch (FLUX, no CFG)."""
    if batch == 2 * num_prompts:
        return slice(num_prompts, None)
    if batch == num_prompts:
        return slice(0, None)
    raise RuntimeError(
        f"attention batch of {batch} rows for {num_prompts} prompts; was the controller built for this run?"
    )


def _complete_rows(kept: torch.Tensor, scaled: torch.Tensor, *, mode: str, kept_first: bool) -> torch.Tensor:
    """A row from a part kept as given and a part that fills the rest (`renorm`); logits mode only concatenates
    (the softmax at the end normalises)."""
    if mode == "rescale":
        room = (1 - kept.sum(-1, keepdim=True)).clamp_min(0)
        scaled = scaled * room / scaled.sum(-1, keepdim=True).clamp_min(1e-30)
    row = torch.cat([kept, scaled] if kept_first else [scaled, kept], dim=-1)
    if mode == "rescale":  # a reweight may push the kept part over one: then the whole row is divided
        row = row / row.sum(-1, keepdim=True).clamp_min(1.0)
    return row


class JointEdit(Controller):
    """The edit at the joint sites of the chosen blocks (module docstring). One controller per run."""

    def __init__(
        self,
        *,
        num_prompts: int,
        kind: str,
        cross_alphas: torch.Tensor,
        self_steps: range,
        cross_blocks: frozenset[str],
        self_blocks: frozenset[str],
        renorm: str = "rescale",
        mapper: torch.Tensor | None = None,
        refine_alphas: torch.Tensor | None = None,
        reweight: torch.Tensor | None = None,
        text_rows: bool = False,
        query_chunk: int | None = DEFAULT_QUERY_CHUNK,
    ):
        super().__init__(num_prompts=num_prompts)
        if num_prompts < 2:
            raise UserError("an edit needs a source prompt and at least one target prompt")
        if kind not in ("replace", "refine", "none"):
            raise UserError(f"edit kind {kind!r} is not supported; use 'replace', 'refine' or 'none'")
        if renorm not in RENORM_MODES:
            raise UserError(f"joint.renorm={renorm!r} is unknown; use one of {RENORM_MODES}")
        if reweight is not None and renorm == "logits" and bool((reweight < 0).any()):
            raise UserError("joint.renorm=logits adds log c to the logits: reweight scales must be ≥ 0")
        self.kind, self.renorm = kind, renorm
        self.cross_alphas, self.self_steps = cross_alphas, self_steps  # (steps, T, L); range of steps
        self.cross_blocks, self.self_blocks = cross_blocks, self_blocks
        self.mapper, self.refine_alphas, self.reweight = mapper, refine_alphas, reweight
        self.text_rows, self.query_chunk = text_rows, query_chunk
        self.row_alignment = self._row_alignment() if text_rows else None  # (T, L): 1 = aligned target token

    def _row_alignment(self) -> torch.Tensor:
        """Target text tokens whose source rows exist: a replace column that reads something, a refine match."""
        if self.kind == "replace":
            return (self.mapper.sum(dim=1) > 0).float()
        if self.kind == "refine":
            return self.refine_alphas.float()
        return torch.ones(self.cross_alphas.shape[1:])

    def _cross_active(self, site: AttentionSite) -> bool:
        step_ok = 0 <= self.step < len(self.cross_alphas) and bool(self.cross_alphas[self.step].any())
        return step_ok and block_of(site.name) in self.cross_blocks

    def _self_active(self, site: AttentionSite) -> bool:
        return self.step in self.self_steps and block_of(site.name) in self.self_blocks

    def wants(self, site):
        if site.kind == "joint":
            return self._cross_active(site) or self._self_active(site)
        return site.kind == "self" and block_of(site.name) in self.self_blocks and self._self_active(site)

    def joint_request(self, site: AttentionSite) -> JointRequest:
        chunk = self.query_chunk
        if chunk and self.text_rows:  # the text rows mix source rows: all of them in the first slice
            chunk = max(chunk, site.num_text_queries)
        return JointRequest(
            query_chunk=chunk or None, scores=self.renorm == "logits", conditional_half=self.num_prompts
        )

    def pooled_active(self, step: int) -> torch.Tensor:
        """(T,) bool: targets inside their cross window at `step` (for the source's pooled vector)."""
        if not 0 <= step < len(self.cross_alphas):
            return torch.zeros(self.cross_alphas.shape[1], dtype=torch.bool)
        return self.cross_alphas[step].amax(dim=-1) > 0

    def __call__(self, maps, site):
        logits = self.renorm == "logits"
        maps = maps.clone()  # the caller's tensor is never edited in place
        cond = maps[conditional_rows(maps.shape[0], self.num_prompts)]
        if site.kind == "self":  # SD3.5's image-only attention: the whole map is image → image
            cond[1:] = cond[:1]
        else:
            self._edit_joint(cond, site, logits=logits)
        return maps.softmax(dim=-1) if logits else maps

    def _edit_joint(self, cond: torch.Tensor, site: AttentionSite, *, logits: bool) -> None:
        """Edits `cond` (P, heads, rows, keys) of this slice of query rows in place."""
        n_text, (start, stop) = site.num_text_keys, site.rows
        if n_text != self.cross_alphas.shape[-1]:
            raise UserError(
                f"joint site {site.name} has {n_text} text tokens but the edit was built for "
                f"{self.cross_alphas.shape[-1]}; build it with the model's text length (p2p.joint_tokens.JointWords)"
            )
        cross, self_ = self._cross_active(site), self._self_active(site)
        source, targets = cond[:1], cond[1:]
        first_image = max(start, n_text) - start  # local index of the first image row
        if first_image < stop - start:
            src, tgt = source[:, :, first_image:], targets[:, :, first_image:]
            text, image = tgt[..., :n_text], tgt[..., n_text:]
            if cross:
                text = self._edit(src[..., :n_text].expand_as(text), text, logits=logits)
            if self_:
                image = src[..., n_text:].expand_as(image)
            targets[:, :, first_image:] = _complete_rows(text, image, mode=self.renorm, kept_first=True)
        if self.text_rows and cross and start < n_text:
            if start != 0 or stop < n_text:
                raise RuntimeError(
                    f"text rows of {site.name} arrived in slices ({start}, {stop}); they must come whole"
                )
            rows = slice(0, n_text)
            src = source[:, :, rows, n_text:].transpose(-1, -2)  # (1, h, image, text): text rows as the last axis
            tgt = targets[:, :, rows, n_text:].transpose(-1, -2)
            alpha = self.cross_alphas[self.step] * self.row_alignment
            edited = edit_columns(
                src.expand_as(tgt),
                tgt,
                kind=self.kind,
                mapper=self.mapper,
                refine_alphas=self.refine_alphas,
                reweight=None,
                alpha=alpha,
                logits=logits,
            ).transpose(-1, -2)
            own_text = targets[:, :, rows, :n_text]
            targets[:, :, rows] = _complete_rows(edited, own_text, mode=self.renorm, kept_first=False)

    def _edit(self, source: torch.Tensor, targets: torch.Tensor, *, logits: bool) -> torch.Tensor:
        return edit_columns(
            source,
            targets,
            kind=self.kind,
            mapper=self.mapper,
            refine_alphas=self.refine_alphas,
            reweight=self.reweight,
            alpha=self.cross_alphas[self.step],
            logits=logits,
        )
