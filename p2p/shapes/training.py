"""Training the built-in tiny model on the shapes world (issue 7): the loop, EMA, checkpoints (losses: p2p/shapes/losses.py).

Two phases, as latent diffusion is trained (Rombach et al. 2022, §3-4):
1. the KL autoencoder: L1 reconstruction + a small KL to N(0, I) (§3.1, "KL-reg");
   optionally a coverage term that writes each latent cell's object coverage (the world knows it) into
   channel 0, the same for every color; then `scale_factor` = 1 / std of the posterior means, so latents are
   roughly unit-variance (the rule behind SD's 0.18215, §4.3.2 and App. G);
2. UNet + text encoder jointly on frozen-VAE latents: ε-prediction MSE (Ho et al. 2020, Eq. 14)
   with t uniform over the SD schedule, captions dropped to "" with probability p so one network
   learns both ε(x, c) and ε(x, ∅) for classifier-free guidance (Ho & Salimans 2022, §3.2);
   optionally a token-grounding term (TokenCompose, Wang et al. 2024) that asks each object's color and
   shape tokens to draw their cross-attention from the object's own pixels, which the world knows exactly.

Every batch comes from `np.random.default_rng([seed, phase, step])`: the data, the noise, the
timesteps and the dropped captions of step k are a function of (seed, k) alone, so a run resumed
from a checkpoint sees exactly the stream an uninterrupted run would. No RNG state is saved.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from models.errors import OutputExistsError, UserError
from models.loader import resolve_device
from models.stable_diffusion import StableDiffusion
from models.text import TextEncoder
from p2p.shapes.grounding import ColorMixer, GroundingCache
from p2p.shapes.losses import RECONSTRUCTION_LOSSES, cell_coverage, diffusion_loss, vae_loss
from p2p.shapes.world import WorldConfig, sample_batch

log = logging.getLogger(__name__)

PHASE_IDS = {"vae": 0, "unet": 1, "scale": 2, "mmdit": 3}  # mixed into the data seed so phases draw different streams


@dataclass
class PhaseConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-4  # AdamW peak learning rate
    warmup_steps: int = 100  # linear warm-up from 0
    min_lr_ratio: float = 0.1  # cosine decay ends at lr × this
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm
    kl_weight: float = 1e-6  # VAE only: weight of the per-image KL sum against the per-pixel reconstruction mean
    reconstruction: str = "l1"  # VAE only: "l1", "mse" or "l1+mse" (per-pixel means, summed)
    caption_dropout: float = 0.1  # UNet only: P(caption → "") for classifier-free guidance
    snr_gamma: float = 0.0  # UNet only: min-SNR-γ loss weight min(SNR_t, γ)/SNR_t (Hang et al. 2023); 0 = off
    ema_decay: float = 0.999  # UNet only: decay of the shipped EMA weights; 0 = no EMA
    grounding: float = 0.0  # UNet only: weight of the token-grounding loss (grounding_loss); 0 = off
    color_mix: float = 0.0  # UNet only: P(a kept caption's features come from other colors but at its color words)
    coverage: float = 0.0  # VAE only: weight of coverage_loss (latent channel 0 = each cell's object coverage); 0 = off
    coverage_ratio: float = 4.0  # VAE only: channel 0 of a fully covered cell, in stds of the other channels

    def __post_init__(self):
        checks = {
            "steps": self.steps >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "warmup_steps": self.warmup_steps >= 0,
            "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
            "weight_decay": self.weight_decay >= 0,
            "grad_clip": self.grad_clip > 0,
            "kl_weight": self.kl_weight >= 0,
            "caption_dropout": 0 <= self.caption_dropout < 1,
            "snr_gamma": self.snr_gamma >= 0,
            "ema_decay": 0 <= self.ema_decay < 1,
            "grounding": self.grounding >= 0,
            "color_mix": 0 <= self.color_mix <= 1,
            "coverage": self.coverage >= 0,
            "coverage_ratio": self.coverage_ratio > 0,
        }
        accepted = {
            "steps": "≥ 1",
            "batch_size": "≥ 1",
            "lr": "> 0",
            "warmup_steps": "≥ 0",
            "min_lr_ratio": "in [0, 1]",
            "weight_decay": "≥ 0",
            "grad_clip": "> 0",
            "kl_weight": "≥ 0",
            "caption_dropout": "in [0, 1)",
            "snr_gamma": "≥ 0 (0 = off)",
            "ema_decay": "in [0, 1) (0 = no EMA)",
            "grounding": "≥ 0 (0 = off)",
            "color_mix": "in [0, 1] (0 = off)",
            "coverage": "≥ 0 (0 = off)",
            "coverage_ratio": "> 0",
        }
        for name, ok in checks.items():
            if not ok:
                raise UserError(f"{name}={getattr(self, name)!r} is out of range; use a value {accepted[name]}")
        if self.reconstruction not in RECONSTRUCTION_LOSSES:
            raise UserError(f"reconstruction={self.reconstruction!r} is not one of {RECONSTRUCTION_LOSSES}")


@dataclass
class TrainConfig:
    seed: int = 0
    device: str = "cpu"
    threads: int = 2  # torch intra-op threads on CPU
    run_dir: str = "runs/train_tiny/default"
    resume: bool = False  # continue from run_dir's checkpoint
    checkpoint_every: int = 250  # steps between checkpoints (also written on SIGTERM / Ctrl-C and at the end)
    log_every: int = 10  # steps between lines of the loss log
    scale_samples: int = 4096  # renders whose latent-mean std gives scale_factor
    vae: PhaseConfig = field(
        default_factory=lambda: PhaseConfig(steps=1500, batch_size=32, lr=1e-3, warmup_steps=50, ema_decay=0.0)
    )
    unet: PhaseConfig = field(
        default_factory=lambda: PhaseConfig(steps=4000, batch_size=64, lr=4e-4, warmup_steps=200, weight_decay=0.01)
    )
    mmdit: PhaseConfig = field(  # arch=mmdit's phase 2 (p2p/shapes/flow_training.py), instead of `unet`
        default_factory=lambda: PhaseConfig(steps=6000, batch_size=64, lr=3e-4, warmup_steps=200, weight_decay=0.01)
    )
    world: dict = field(default_factory=dict)  # WorldConfig overrides (empty = the default world)

    def __post_init__(self):
        for name in ("threads", "checkpoint_every", "log_every", "scale_samples"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)!r} is out of range; use a value ≥ 1")
        self.device = str(resolve_device(self.device))


RUN_FILES = tuple(f"{phase}-{kind}" for phase in ("vae", "unet", "mmdit") for kind in ("last.pt", "log.jsonl"))


def check_run_dir(run_dir: str | Path, *, resume: bool) -> None:
    """A fresh run never writes over an earlier run's checkpoints and logs: it must resume it or go elsewhere."""
    found = [name for name in RUN_FILES if (Path(run_dir) / name).exists()]
    if found and not resume:
        raise OutputExistsError(
            f"{run_dir} already holds a training run ({', '.join(found)}); continue it with "
            "resume=true, or start a new one elsewhere (name=... or run_dir=...)"
        )


# ----------------------------------------------------------------------------- data


def step_rng(seed: int, phase: str, step: int) -> np.random.Generator:
    """The generator of one step's batch: a pure function of (seed, phase, step)."""
    return np.random.default_rng([seed, PHASE_IDS[phase], step])


def torch_generator(rng: np.random.Generator) -> torch.Generator:
    """A CPU torch generator seeded from `rng`, for noise and timesteps (drawn on the CPU, then moved)."""
    return torch.Generator("cpu").manual_seed(int(rng.integers(2**62)))


class TokenCache:
    """Token ids per caption. The world has a few thousand captions; CLIP's BPE is slow per call."""

    def __init__(self, text_encoder: TextEncoder):
        self.text_encoder, self.ids = text_encoder, {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = sorted({c for c in captions if c not in self.ids})
        if missing:
            self.ids.update(zip(missing, self.text_encoder.tokenize(missing)))
        return torch.stack([self.ids[c] for c in captions])


def drop_captions(captions: list[str], *, p: float, rng: np.random.Generator) -> list[str]:
    """Replace each caption by "" (the unconditional prompt used at sampling time) with probability p."""
    drop = rng.random(len(captions)) < p
    return ["" if d else c for c, d in zip(captions, drop)]


# ----------------------------------------------------------------------------- scale


@torch.no_grad()
def latent_std(
    model: StableDiffusion, *, samples: int, seed: int, batch_size: int = 256, world: WorldConfig = WorldConfig()
) -> float:
    """Std of the VAE's posterior means (unscaled) over `samples` renders: scale_factor = 1 / this."""
    means = []
    for i in range(math.ceil(samples / batch_size)):
        images, _, _ = sample_batch(step_rng(seed, "scale", i), min(batch_size, samples - i * batch_size), config=world)
        means.append(model.vae.encode(images.to(model.device)).mean.float().cpu())
    return torch.cat(means).std().item()


# ----------------------------------------------------------------------------- optimisation


def learning_rate(step: int, cfg: PhaseConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr × min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class EMA:
    """Exponential moving average of parameters (Polyak averaging), with the usual warm-up of the decay
    min(decay, (1 + n) / (10 + n)) so early updates are not dominated by the random initialisation."""

    def __init__(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]], *, decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = {name: p.detach().clone().float() for name, p in named_parameters}

    @torch.no_grad()
    def update(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]]) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in named_parameters:
            self.shadow[name].lerp_(p.detach().float(), 1 - decay)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        """Write the averaged weights into `module` (names as in module.named_parameters())."""
        params = dict(module.named_parameters())
        for name, value in self.shadow.items():
            params[name].copy_(value.to(params[name].dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}


# ----------------------------------------------------------------------------- the loop


class StopRequested(Exception):
    """Raised by the loop after SIGTERM or Ctrl-C, once the checkpoint is written."""


def checkpoint_path(run_dir: str | Path, phase: str) -> Path:
    return Path(run_dir) / f"{phase}-last.pt"


def save_state(path: Path, state: dict) -> None:
    """Write atomically (temp file + rename): a kill mid-write never leaves a truncated checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


TRAINED_PREFIXES = {  # phase → the parameters it trains (the others stay frozen)
    "vae": ("first_stage_model.",),
    "unet": ("model.diffusion_model.", "cond_stage_model."),  # UNet + text encoder
    "mmdit": ("model.diffusion_model.", "text_encoders."),  # FlowModel: MM-DiT + CLIP-L, CLIP-G and T5
}


def trainable_parameters(model: torch.nn.Module, phase: str) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters `phase` trains (TRAINED_PREFIXES); the VAE stays frozen after phase 1."""
    prefixes = TRAINED_PREFIXES[phase]
    return [(n, p) for n, p in model.named_parameters() if n.startswith(prefixes)]


StepLoss = Callable[[int, np.random.Generator], tuple[torch.Tensor, dict[str, float]]]


def train_phase(
    model: StableDiffusion,
    *,
    phase: str,
    cfg: PhaseConfig,
    loss_at_step: StepLoss,
    seed: int,
    run_dir: str | Path,
    resume: bool,
    checkpoint_every: int,
    log_every: int,
    progress: bool = True,
) -> EMA | None:
    """Optimise `trainable_parameters(model, phase)` for cfg.steps steps of `loss_at_step(step, rng)`.

    Resumable: with resume=True the phase checkpoint (model, optimizer, EMA, step) is loaded and the loop
    continues at its step; the data stream is a function of the step, so the result equals an
    uninterrupted run. Checkpoints every `checkpoint_every` steps, at the end, and after the step during which SIGTERM or
    Ctrl-C arrived (then raises StopRequested).
    Losses go to `run_dir/{phase}-log.jsonl`. Returns the EMA (None when cfg.ema_decay == 0).
    """
    run_dir = Path(run_dir)
    named = trainable_parameters(model, phase)
    model.requires_grad_(False)
    for _, p in named:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for _, p in named], lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(named, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    start, path = 0, checkpoint_path(run_dir, phase)
    if resume and path.exists():
        state = torch.load(path, map_location=model.device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start = state["step"]
        log.info("resuming %s at step %d from %s", phase, start, path)

    def save(step: int) -> None:
        save_state(
            path,
            {
                "step": step,
                "phase": phase,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "ema": ema.state_dict() if ema else None,
                "config": asdict(cfg),
            },
        )

    stop = {"signal": None}

    def request_stop(signum, frame):  # finish the current step, checkpoint, then stop; a second Ctrl-C kills
        if stop["signal"] == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop["signal"] = signum

    previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    log_file = open(run_dir / f"{phase}-log.jsonl", "a")
    model.train()
    step, bar = (
        start,
        tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=phase, disable=not progress, mininterval=5),
    )
    began = time.time()
    try:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, cfg)
            loss, metrics = loss_at_step(step, step_rng(seed, phase, step))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.grad_clip)
            optimizer.step()
            if ema is not None:
                ema.update(named)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            if step % log_every == 0 or step == cfg.steps - 1:
                log_file.write(
                    json.dumps(
                        {
                            "step": step,
                            "loss": loss.item(),
                            **metrics,
                            "grad_norm": grad_norm.item(),
                            "lr": learning_rate(step, cfg),
                            "elapsed_s": round(time.time() - began, 1),
                        }
                    )
                    + "\n"
                )
                log_file.flush()
            if (step + 1) % checkpoint_every == 0:
                save(step + 1)
            if stop["signal"] is not None:
                save(step + 1)
                raise StopRequested(
                    f"{phase}: stopped by signal {stop['signal']} after step {step + 1}; "
                    f"checkpoint {path}; continue with resume=true"
                )
        save(cfg.steps)
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
        log_file.close()
        bar.close()
        model.eval()
    return ema


# ----------------------------------------------------------------------------- the two phases


def train_vae(model: StableDiffusion, cfg: TrainConfig, **loop) -> None:
    world = WorldConfig(**cfg.world)

    def loss_at_step(step: int, rng: np.random.Generator):
        images, _, scenes = sample_batch(rng, cfg.vae.batch_size, config=world)
        coverage = cell_coverage(scenes, model.config.latent_factor) if cfg.vae.coverage > 0 else None
        return vae_loss(
            model,
            images.to(model.device),
            kl_weight=cfg.vae.kl_weight,
            generator=torch_generator(rng),
            reconstruction=cfg.vae.reconstruction,
            coverage=coverage,
            coverage_weight=cfg.vae.coverage,
            coverage_ratio=cfg.vae.coverage_ratio,
        )

    train_phase(
        model,
        phase="vae",
        cfg=cfg.vae,
        loss_at_step=loss_at_step,
        seed=cfg.seed,
        run_dir=cfg.run_dir,
        resume=cfg.resume,
        checkpoint_every=cfg.checkpoint_every,
        log_every=cfg.log_every,
        **loop,
    )


def train_unet(model: StableDiffusion, cfg: TrainConfig, **loop) -> EMA | None:
    """Needs model.config.scale_factor set (after phase 1). Returns the EMA of UNet + text weights."""
    world, tokens = WorldConfig(**cfg.world), TokenCache(model.text_encoder)
    grounding = GroundingCache(model.context_length) if cfg.unet.grounding > 0 else None
    mixer = ColorMixer(world, tokens, model.context_length) if cfg.unet.color_mix > 0 else None  # 0: rng untouched

    def loss_at_step(step: int, rng: np.random.Generator):
        images, captions, scenes = sample_batch(rng, cfg.unet.batch_size, config=world)
        with torch.no_grad():
            latents = model.encode_images(images)  # posterior mean × scale_factor; the VAE is frozen
        captions = drop_captions(captions, p=cfg.unet.caption_dropout, rng=rng)
        mix = mixer(scenes, captions, p=cfg.unet.color_mix, rng=rng) if mixer is not None else None
        return diffusion_loss(
            model,
            latents,
            tokens(captions),
            generator=torch_generator(rng),
            snr_gamma=cfg.unet.snr_gamma,
            grounding_weight=cfg.unet.grounding,
            grounding=grounding(scenes, captions) if grounding is not None else None,
            mix=mix,
        )

    return train_phase(
        model,
        phase="unet",
        cfg=cfg.unet,
        loss_at_step=loss_at_step,
        seed=cfg.seed,
        run_dir=cfg.run_dir,
        resume=cfg.resume,
        checkpoint_every=cfg.checkpoint_every,
        log_every=cfg.log_every,
        **loop,
    )


def train(model: StableDiffusion, cfg: TrainConfig, *, progress: bool = True) -> StableDiffusion:
    """Both phases on `model` (in place); returns it with the UNet/text EMA weights and scale_factor set.

    A finished phase is skipped on resume: its checkpoint holds cfg.steps as its step.
    """
    check_run_dir(cfg.run_dir, resume=cfg.resume)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    vae_state = checkpoint_path(cfg.run_dir, "vae")
    vae_done = cfg.resume and vae_state.exists() and torch.load(vae_state, weights_only=True)["step"] >= cfg.vae.steps
    if not vae_done:
        train_vae(model, cfg, progress=progress)
    else:
        model.load_state_dict(torch.load(vae_state, map_location=model.device, weights_only=True)["model"])
    model.config.scale_factor = 1.0 / latent_std(
        model, samples=cfg.scale_samples, seed=cfg.seed, world=WorldConfig(**cfg.world)
    )
    log.info("scale_factor = %.5f", model.config.scale_factor)
    ema = train_unet(model, cfg, progress=progress)
    if ema is not None:
        ema.copy_to(model)
    return model
