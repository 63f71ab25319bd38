"""Benchmark: what P2P editing costs over plain sampling, and what the reference's scheme costs over ours.

    python scripts/bench.py                                   # built-in model, 50 steps
    python scripts/bench.py model=sd15 random_weights=true height=512 width=512 steps=2 device=cpu

On one UNet and the same prompts and seed, each scheme runs in its own subprocess (so peak memory is its own):
  (a) plain  — batched sampling of the prompts, fused attention everywhere;
  (b) p2p    — our edit (replace, cross 0.8, self 0.4): maps materialised only where edited;
  (c) reference — the official code's scheme: explicit softmax in every layer, every step, and a store of all
      maps with ≤ (latent/2)² queries, heads kept, summed every step — plus the same edit.
Prints seconds and peak extra memory of each, and the ratios (b)/(a) (target ≤ 1.10) and (c)/(b) (target ≥ 2).
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts._cli import entry_point  # noqa: E402
from scripts._common import load_model, prompt_list, sampler_settings  # noqa: E402
from models.errors import UserError  # noqa: E402
from models.attention import AttentionSite  # noqa: E402
from models.stable_diffusion import StableDiffusion, preset  # noqa: E402
from p2p.controllers import Compose, Controller  # noqa: E402
from p2p.edit import EditSpec, build_edit  # noqa: E402
from p2p.pipeline import image_size, initial_latent, sample  # noqa: E402

SCHEMES = ("plain", "p2p", "reference")


class ReferenceScheme(Controller):
    """The official code's cost model: every layer explicit; maps ≤ max_queries stored per step with heads."""

    def __init__(self, *, num_prompts: int, max_queries: int):
        super().__init__(num_prompts=num_prompts)
        self.max_queries = max_queries
        self.step_store: dict[str, torch.Tensor] = {}
        self.attention_store: dict[str, torch.Tensor] = {}

    def begin_step(self, step: int) -> None:
        super().begin_step(step)
        for name, maps in self.step_store.items():
            self.attention_store[name] = self.attention_store.get(name, 0) + maps
        self.step_store = {}

    def wants(self, site: AttentionSite) -> bool:
        return True

    def __call__(self, probs, site):
        if site.num_queries <= self.max_queries:
            self.step_store[site.name] = self.conditional(probs).clone()
        return probs


def build_model(cfg: DictConfig) -> StableDiffusion:
    if not cfg.random_weights:
        return load_model(cfg)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = StableDiffusion(preset(cfg.model.name))
    model = model.to_empty(device=cfg.device)
    with torch.no_grad():
        for p in model.parameters():  # scaled noise: activations stay finite; the values do not matter here
            p.normal_(0, 0.02)
    return model.eval().requires_grad_(False)


def peak_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_scheme(cfg: DictConfig) -> dict:
    model = build_model(cfg)
    prompts = prompt_list(cfg.prompts, minimum=2)
    settings = sampler_settings(cfg, model)
    height, width = image_size(model, cfg.height, cfg.width)
    latent = initial_latent(cfg.seed, height=height, width=width, latent_factor=model.config.latent_factor)
    latent_hw = tuple(latent.shape[-2:])
    spec = EditSpec(kind="replace", cross_replace_steps=0.8, self_replace_steps=0.4)
    controller = None
    if cfg.scheme != "plain":
        controller = build_edit(spec, prompts, num_steps=settings.steps, latent_hw=latent_hw,
                                context_length=model.context_length)
    if cfg.scheme == "reference":
        store = ReferenceScheme(num_prompts=len(prompts), max_queries=(latent_hw[0] // 2) * (latent_hw[1] // 2))
        controller = Compose([store, controller])
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = peak_memory_bytes(cfg.device) if cfg.device.startswith("cuda") else _rss_bytes()
    start = time.perf_counter()
    sample(model, prompts, latent=latent, settings=settings, controller=controller, progress=False)
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"scheme": cfg.scheme, "seconds": seconds, "peak_extra_bytes": max(0, peak_memory_bytes(cfg.device) - before)}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@entry_point("bench")
def main(cfg: DictConfig) -> None:
    if cfg.scheme != "all":
        if cfg.scheme not in SCHEMES:
            raise UserError(f"scheme={cfg.scheme!r}; choose one of {SCHEMES} or 'all'")
        print("RESULT " + json.dumps(run_scheme(cfg)))
        return
    overrides = [a for a in sys.argv[1:] if not a.startswith("scheme=")]
    results = {}
    for scheme in SCHEMES:
        child = subprocess.run([sys.executable, __file__, f"scheme={scheme}", "hydra.run.dir=.", "hydra.output_subdir=null",
                                *overrides], capture_output=True, text=True, check=True)
        line = next(l for l in child.stdout.splitlines() if l.startswith("RESULT "))
        results[scheme] = json.loads(line[len("RESULT "):])
    a, b, c = (results[s] for s in SCHEMES)
    print(f"model={cfg.model.name} {'random weights ' if cfg.random_weights else ''}size={cfg.height or 'native'}x{cfg.width or 'native'} "
          f"steps={cfg.steps} prompts={len(cfg.prompts)} device={cfg.device} threads={torch.get_num_threads()}")
    for r in (a, b, c):
        print(f"  {r['scheme']:<10} {r['seconds']:8.2f} s   peak extra memory {r['peak_extra_bytes'] / 2**20:9.1f} MiB")
    mem = lambda x, y: x["peak_extra_bytes"] / max(y["peak_extra_bytes"], 1)
    print(f"  (b)/(a) time {b['seconds'] / a['seconds']:.3f} (target <= 1.10)   memory {mem(b, a):.2f}")
    print(f"  (c)/(b) time {c['seconds'] / b['seconds']:.3f} (target >= 2)      memory {mem(c, b):.2f}")


if __name__ == "__main__":
    main()
