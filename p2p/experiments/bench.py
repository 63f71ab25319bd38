"""What the editing costs (issue 3): plain sampling, our P2P edit, and the reference code's scheme on our UNet.

Three schemes of the same two-prompt batch, same seed and steps: `plain` (no controller), `p2p` (replace edit,
cross 0.8 / self 0.4: maps materialised only where injected) and `reference` (the official code's cost model:
every layer explicit, every map of ≤ latent/2 side stored per step with its heads). `scripts/bench.py` runs each
in its own process, so that peak memory is the scheme's own, and prints the ratios.
"""

from __future__ import annotations

import resource
import time

import torch

from models.attention import AttentionSite
from models.loader import resolve_dtype
from models.stable_diffusion import StableDiffusion, preset
from p2p.controllers import Compose, Controller
from p2p.edit import EditSpec, build_edit
from p2p.pipeline import SamplerSettings, image_size, initial_latent, sample

SCHEMES = ("plain", "p2p", "reference")
BENCH_EDIT = EditSpec(kind="replace", cross_replace_steps=0.8, self_replace_steps=0.4)


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


def random_model(
    name: str, *, device: str = "cpu", dtype: str = "fp32", weights_dtype: str | None = None
) -> StableDiffusion:
    """A preset's architecture with random weights (scaled noise: activations stay finite), for timing only;
    parameters held in `weights_dtype` (default `dtype`) and computed in `dtype`, as the loader does."""
    compute, stored = resolve_dtype(dtype), resolve_dtype(weights_dtype or dtype)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = StableDiffusion(preset(name))
    model = model.to_empty(device=device).to(stored)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.compute_dtype = compute
    return model.eval().requires_grad_(False)


def peak_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def scheme_controller(
    model: StableDiffusion, prompts: list[str], *, scheme: str, steps: int, latent: torch.Tensor
) -> Controller | None:
    """None for `plain`; the bench's edit for `p2p`; the edit under the reference's store for `reference`."""
    if scheme == "plain":
        return None
    latent_hw = tuple(latent.shape[-2:])
    controller = build_edit(
        BENCH_EDIT, prompts, num_steps=steps, latent_hw=latent_hw, context_length=model.context_length
    )
    if scheme == "reference":
        store = ReferenceScheme(num_prompts=len(prompts), max_queries=(latent_hw[0] // 2) * (latent_hw[1] // 2))
        controller = Compose([store, controller])
    return controller


def measure(
    model: StableDiffusion,
    prompts: list[str],
    *,
    scheme: str,
    settings: SamplerSettings,
    seed: int,
    height: int | None = None,
    width: int | None = None,
) -> dict:
    """Time and peak extra memory of sampling `prompts` under one scheme (call it in a fresh process)."""
    device = str(model.device)
    height, width = image_size(model, height, width)
    latent = initial_latent(
        seed, height=height, width=width, latent_factor=model.config.latent_factor, multiple=model.config.size_multiple
    )
    controller = scheme_controller(model, prompts, scheme=scheme, steps=settings.steps, latent=latent)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = peak_memory_bytes(device) if device.startswith("cuda") else _rss_bytes()
    start = time.perf_counter()
    sample(model, prompts, latent=latent, settings=settings, controller=controller, progress=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"scheme": scheme, "seconds": seconds, "peak_extra_bytes": max(0, peak_memory_bytes(device) - before)}


def report(results: dict[str, dict], *, header: str) -> str:
    """The three schemes side by side and their ratios, with the targets of issue 3."""
    a, b, c = (results[s] for s in SCHEMES)
    lines = [header] + [
        f"  {r['scheme']:<10} {r['seconds']:8.2f} s   peak extra memory {r['peak_extra_bytes'] / 2**20:9.1f} MiB"
        for r in (a, b, c)
    ]
    mem = lambda x, y: x["peak_extra_bytes"] / max(y["peak_extra_bytes"], 1)  # noqa: E731
    lines.append(f"  (b)/(a) time {b['seconds'] / a['seconds']:.3f} (target <= 1.10)   memory {mem(b, a):.2f}")
    lines.append(f"  (c)/(b) time {c['seconds'] / b['seconds']:.3f} (target >= 2)      memory {mem(c, b):.2f}")
    return "\n".join(lines)
