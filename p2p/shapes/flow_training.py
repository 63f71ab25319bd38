"""Training the built-in tiny MM-DiT (`tiny_mmdit`, issue 33) on the shapes world, with the loop, EMA and
checkpoints of p2p/shapes/training.py.

Two phases, as for the tiny UNet (`training.train`), on an ordinary `FlowModel` in SD3's layout:
1. the 16-channel VAE: `training.train_vae` unchanged (reconstruction + KL, optionally the coverage term that
   writes each latent cell's object coverage into channel 0); then the latent scaling SD3 uses, latents =
   (z − shift)·scale, with shift = the mean and scale = 1 / std of the posterior means over `scale_samples`
   renders (how SD3's 0.0609 / 1.5305 are defined; stored in the config's `latent_scale` / `latent_shift`);
2. phase "mmdit": the MM-DiT and the three text encoders (tiny CLIP-L, CLIP-G and T5, from scratch) jointly,
   with the rectified-flow loss of SD3 (Esser et al. 2024, §2-3): x_σ = (1 − σ)·x₀ + σ·ε, the model predicts
   v = ε − x₀ at timestep 1000·σ, σ = sigmoid(u) with u ~ N(0, 1) ("logit-normal sampling", §3.1, Eq. 19, the
   paper's best, lognorm(0.00, 1.00)); captions dropped to "" with probability p for classifier-free guidance
   (sampling uses "" as the unconditional prompt); the EMA of the weights is what ships.

T5's tokenizer is a SentencePiece BPE model trained on the world's captions (`train_world_tokenizer`): 76 pieces,
so "red" and "circle" are one piece while "purple", "yellow" and "white" are two or more (CLIP has one token for
each): the two token spaces split words differently, as SD3's do, and the CLIP + T5 aligner has work to do.
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path

import numpy as np
import torch

from models.files import atomic_path
from models.flow_model import FlowModel
from p2p.shapes.training import (
    EMA,
    TrainConfig,
    check_run_dir,
    checkpoint_path,
    drop_captions,
    step_rng,
    torch_generator,
    train_phase,
    train_vae,
)
from p2p.shapes.world import MAX_OBJECTS, WorldConfig, all_captions, sample_batch

log = logging.getLogger(__name__)

TOKENIZER_PIECES = 76  # BPE pieces of the world's tokenizer: most words whole, colors split (see the docstring)
LOGIT_NORMAL_MEAN, LOGIT_NORMAL_STD = 0.0, 1.0  # Esser et al. 2024 §5.1: lognorm(0.00, 1.00) ranked first
# T5's special pieces (transformers' T5 tokenizer: <pad> 0, </s> 1, <unk> 2, no <s>); models/t5.py reads them
T5_SPECIAL_PIECES = dict(
    pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>"
)


# ----------------------------------------------------------------------------- the tokenizer


def train_world_tokenizer(path: str | Path, *, world: WorldConfig = WorldConfig()) -> Path:
    """A SentencePiece BPE model (T5's special ids) trained on every caption of the world → `path`.
    Deterministic: the same world gives the same pieces (one thread, fixed caption order)."""
    import sentencepiece

    captions = [c for n in range(1, MAX_OBJECTS + 1) for c in all_captions(num_objects=n, config=world)]
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(captions),
        model_writer=buffer,
        vocab_size=TOKENIZER_PIECES,
        model_type="bpe",
        character_coverage=1.0,
        normalization_rule_name="identity",  # the captions are plain ASCII; NFKC's table alone would be 240 kB
        num_threads=1,
        minloglevel=2,
        **T5_SPECIAL_PIECES,
    )
    with atomic_path(path, overwrite=True) as partial:
        Path(partial).write_bytes(buffer.getvalue())
    return Path(path)


class FlowTokenCache:
    """Token ids of every text encoder per caption (CLIP's BPE is slow per call; the world has ~1300 captions)."""

    def __init__(self, model: FlowModel):
        self.model, self.ids = model, {}

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        missing = sorted({c for c in captions if c not in self.ids})
        if missing:
            encoded = self.model.tokenize(missing)
            self.ids.update({c: {part: ids[i] for part, ids in encoded.items()} for i, c in enumerate(missing)})
        return {part: torch.stack([self.ids[c][part] for c in captions]) for part in self.ids[captions[0]]}


# ----------------------------------------------------------------------------- initialisation

TIMESTEP_INIT_STD = 0.02  # DiT's normal init of the timestep MLP


@torch.no_grad()
def dit_initialize_(transformer: torch.nn.Module) -> torch.nn.Module:
    """DiT's initialisation for training from scratch (Peebles & Xie 2023, §3.2 "adaLN-Zero";
    facebookresearch/DiT `models.py` `initialize_weights`), which the released SD3 weights never needed here:
    Xavier-uniform linear layers and patch projection with zero biases, the timestep MLP ~ N(0, 0.02), and every
    adaLN modulation and the final projection zero, so each joint block starts as the identity (gates 0) and the
    first prediction is v = 0. In place, from torch's global generator (seed it first); returns `transformer`."""
    for module in transformer.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    proj = transformer.x_embedder.proj
    torch.nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    torch.nn.init.zeros_(proj.bias)
    for layer in (transformer.t_embedder.mlp[0], transformer.t_embedder.mlp[2]):
        torch.nn.init.normal_(layer.weight, std=TIMESTEP_INIT_STD)
    zeroed = [transformer.final_layer.linear, transformer.final_layer.adaLN_modulation[-1]]
    for block in transformer.joint_blocks:
        zeroed += [block.context_block.adaLN_modulation[-1], block.x_block.adaLN_modulation[-1]]
    for layer in zeroed:
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    return transformer


# ----------------------------------------------------------------------------- the loss


def logit_normal_sigmas(batch: int, *, generator: torch.Generator) -> torch.Tensor:
    """σ = sigmoid(m + s·u), u ~ N(0, 1): SD3's training distribution of noise levels (Esser et al. 2024, Eq. 19),
    which puts most samples near σ = 0.5, where the velocity is hardest to predict."""
    return torch.sigmoid(LOGIT_NORMAL_MEAN + LOGIT_NORMAL_STD * torch.randn(batch, generator=generator))


def flow_matching_loss(
    model: FlowModel, latents: torch.Tensor, token_ids: dict[str, torch.Tensor], *, generator: torch.Generator
) -> tuple[torch.Tensor, dict[str, float]]:
    """‖v_θ(x_σ, 1000·σ, c) − (ε − x₀)‖² with x_σ = (1 − σ)·x₀ + σ·ε (models/flow.py's convention) and σ
    logit-normal: the conditional flow-matching loss of rectified flow (Esser et al. 2024, Eq. 2-3)."""
    device = latents.device
    noise = torch.randn(latents.shape, generator=generator).to(device)
    sigma = logit_normal_sigmas(latents.shape[0], generator=generator).to(device)
    noisy = (1 - sigma[:, None, None, None]) * latents + sigma[:, None, None, None] * noise
    text = model.conditioning_from_tokens({k: v.to(device) for k, v in token_ids.items()})
    velocity = model.transformer(
        noisy, timesteps=1000.0 * sigma, context=text.context, pooled=text.pooled, text_segments=text.text_segments
    )
    mse = (velocity.float() - (noise - latents)).pow(2).mean()
    return mse, {"mse": mse.item(), "sigma_mean": sigma.mean().item()}


# ----------------------------------------------------------------------------- the phases


@torch.no_grad()
def latent_statistics(
    model: FlowModel, *, samples: int, seed: int, world: WorldConfig, batch_size: int = 256
) -> tuple[float, float]:
    """(mean, std) of the VAE's posterior means over `samples` renders: latent_shift and 1 / latent_scale."""
    means = []
    for i in range(math.ceil(samples / batch_size)):
        images, _, _ = sample_batch(step_rng(seed, "scale", i), min(batch_size, samples - i * batch_size), config=world)
        means.append(model.vae.encode(images.to(model.device)).mean.float().cpu())
    means = torch.cat(means)
    return means.mean().item(), means.std().item()


def encode_latents(model: FlowModel, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] → model latents (z − shift)·scale of the posterior means (the VAE is frozen)."""
    with torch.no_grad():
        return model.latent_scaling.to_model(model.vae.encode(images.to(model.device)).mean)


def train_mmdit(model: FlowModel, cfg: TrainConfig, **loop) -> EMA | None:
    """Phase 2 (needs the latent scaling set). Returns the EMA of the MM-DiT + text encoder weights."""
    world, tokens, phase = WorldConfig(**cfg.world), FlowTokenCache(model), cfg.mmdit

    def loss_at_step(step: int, rng: np.random.Generator):
        images, captions, _ = sample_batch(rng, phase.batch_size, config=world)
        latents = encode_latents(model, images)
        captions = drop_captions(captions, p=phase.caption_dropout, rng=rng)
        return flow_matching_loss(model, latents, tokens(captions), generator=torch_generator(rng))

    return train_phase(
        model,
        phase="mmdit",
        cfg=phase,
        loss_at_step=loss_at_step,
        seed=cfg.seed,
        run_dir=cfg.run_dir,
        resume=cfg.resume,
        checkpoint_every=cfg.checkpoint_every,
        log_every=cfg.log_every,
        **loop,
    )


def check_flow_phase(cfg: TrainConfig) -> None:
    """The UNet-only settings of phase 2 have no meaning for the MM-DiT: refuse them rather than ignore them."""
    from models.errors import UserError

    for name in ("snr_gamma", "grounding", "color_mix"):
        if getattr(cfg.mmdit, name) != 0:
            raise UserError(
                f"mmdit.{name}={getattr(cfg.mmdit, name)!r}: only the UNet's phase has it (ε-prediction / UNet "
                f"cross-attention); use mmdit.{name}=0 with arch=mmdit"
            )


def train_flow(model: FlowModel, cfg: TrainConfig, *, progress: bool = True) -> FlowModel:
    """Both phases on `model` (in place, its T5 tokenizer set); returns it with the EMA weights and the latent
    scaling in its config. A finished VAE phase is skipped on resume, as in `training.train`."""
    check_flow_phase(cfg)
    check_run_dir(cfg.run_dir, resume=cfg.resume)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    world = WorldConfig(**cfg.world)
    vae_state = checkpoint_path(cfg.run_dir, "vae")
    vae_done = cfg.resume and vae_state.exists() and torch.load(vae_state, weights_only=True)["step"] >= cfg.vae.steps
    if not vae_done:
        train_vae(model, cfg, progress=progress)
    else:
        model.load_state_dict(torch.load(vae_state, map_location=model.device, weights_only=True)["model"])
    shift, std = latent_statistics(model, samples=cfg.scale_samples, seed=cfg.seed, world=world)
    model.config.latent_shift, model.config.latent_scale = shift, 1.0 / std
    log.info("latent shift %.5f, scale %.5f", shift, 1.0 / std)
    ema = train_mmdit(model, cfg, progress=progress)
    if ema is not None:
        ema.copy_to(model)
    return model
