"""This stack side by side with diffusers' own pipeline, on the same weights (issue 26): `bench.py diffusers=true`.

Four schemes of the same prompts, size, steps, guidance, dtype, threads and x_T, each timed from the prompts to
the decoded images (text encoding and VAE decoding included, loading excluded) in a fresh process of its own:
  (1) diffusers — `StableDiffusionPipeline` / `StableDiffusionXLPipeline` (DDIM, no safety checker, no progress
      bar), built from the single-file checkpoint by diffusers' own converters (`diffusers_pipeline.py`);
  (2) plain — our batched sampling (`p2p.pipeline.sample` + `decode`) of the same file;
  (3) p2p — our edit of the same prompts (`bench.BENCH_EDIT`);
  (4) reference — the official code's scheme on our UNet (`bench.ReferenceScheme` + the edit).
Repeats are interleaved (r1: 1 2 3 4, r2: 1 2 3 4, …) so that a change in the machine's load falls on every
scheme alike; ratios are taken within a repeat, then summarised as min / median / max.

Memory is the process's peak resident memory above its level just before the run (weights loaded): the
kernel's own high-water mark (VmHWM), reset with `/proc/self/clear_refs` ("5", Linux ≥ 4.0), so no peak is
missed between samples; the heap's free memory is handed back first (`malloc_trim`) so that what an earlier
allocation left resident does not hide a peak. Both sides read the weights into anonymous memory (no mmapped file pages are touched
during the run). On CUDA: `torch.cuda.max_memory_allocated` above the allocated level before.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from models.errors import UserError
from models.loader import CONFIG_METADATA_KEY, load_checkpoint, resolve_dtype, save_checkpoint
from models.stable_diffusion import ModelConfig
from p2p.experiments.bench import random_model, scheme_controller
from p2p.pipeline import SamplerSettings, decode, initial_latent, sample

SIDE_BY_SIDE = ("diffusers", "plain", "p2p", "reference")
LABELS = {
    "diffusers": "(1) diffusers' pipeline",
    "plain": "(2) our plain sampling",
    "p2p": "(3) our P2P edit",
    "reference": "(4) reference scheme, our UNet",
}
# (numerator, denominator, target) of each ratio printed; targets from issue 26
RATIOS = (
    ("plain", "diffusers", "time and memory <= 1.0"),
    ("p2p", "diffusers", "time <= 1.10"),
    ("reference", "p2p", ""),
)
RANDOM_FILE_DTYPE = "fp16"  # random weights are written in fp16 (half the disk); both sides cast them to `dtype`
CLEAR_REFS_RESET_PEAK = "5"  # Documentation/filesystems/proc.rst: resets the peak resident set size (VmHWM)
MIB = 2**20


@dataclass(frozen=True)
class Job:
    """One scheme's run, everything a fresh process needs (picklable)."""

    scheme: str
    checkpoint: str
    config_json: str  # ModelConfig.to_json()
    prompts: tuple[str, ...]
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    height: int
    width: int
    dtype: str
    device: str
    threads: int


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    raise UserError(f"/proc/self/status has no {field}: peak memory on the CPU needs Linux")


def _return_free_heap() -> None:
    """glibc keeps freed memory resident for reuse: a run after a loading that freed much (diffusers builds its text
    encoders, then loads their weights) would peak lower in resident memory than its allocations did. `malloc_trim`
    gives it back first, so that both sides start from their live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def reset_peak(device: str) -> int:
    """Start a peak measurement now; returns the level it is measured above."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    _return_free_heap()
    try:
        Path("/proc/self/clear_refs").write_text(CLEAR_REFS_RESET_PEAK)
    except OSError as err:
        raise UserError(f"cannot reset the peak resident memory ({err}): the side-by-side bench needs Linux") from err
    return _status_bytes("VmRSS")


def peak(device: str) -> int:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status_bytes("VmHWM")


def _diffusers_run(job: Job, config: ModelConfig, latent: torch.Tensor):
    from p2p.experiments.diffusers_pipeline import pipeline_from_file, write_tokenizer_files  # needs '.[bench]'

    with tempfile.TemporaryDirectory() as tokenizer_dir:
        pipe = pipeline_from_file(
            Path(job.checkpoint),
            config,
            tokenizer_dir=write_tokenizer_files(Path(tokenizer_dir)),
            dtype=resolve_dtype(job.dtype),
        ).to(job.device)
    pipe.set_progress_bar_config(disable=True)
    # SDXL base encodes "" as zeros (ours: `force_zeros_for_empty_prompt`); diffusers does so for None only
    zeros = job.negative_prompt == "" and config.force_zeros_for_empty_prompt
    negative = None if zeros else [job.negative_prompt] * len(job.prompts)
    latents = latent.expand(len(job.prompts), -1, -1, -1).to(job.device, resolve_dtype(job.dtype))  # one x_T, all

    def run() -> np.ndarray:
        images = pipe(
            prompt=list(job.prompts),
            negative_prompt=negative,
            latents=latents.clone(),
            height=job.height,
            width=job.width,
            num_inference_steps=job.steps,
            guidance_scale=job.guidance,
            output_type="np",
        ).images  # float in [0, 1], (P, H, W, 3)
        return images * 255

    return run


def _our_run(job: Job, config: ModelConfig, latent: torch.Tensor):
    model = load_checkpoint(job.checkpoint, config=config, dtype=job.dtype, device=job.device)
    settings = SamplerSettings(steps=job.steps, guidance=job.guidance)

    def run() -> np.ndarray:
        controller = scheme_controller(model, list(job.prompts), scheme=job.scheme, steps=job.steps, latent=latent)
        x = sample(
            model,
            list(job.prompts),
            latent=latent,
            settings=settings,
            negative_prompt=job.negative_prompt,
            controller=controller,
            progress=False,
        )
        return decode(model, x)  # uint8 (P, H, W, 3)

    return run


def run_job(job: Job) -> dict:
    """Load, then time and measure one scheme (call it in a fresh process: `side_by_side` does)."""
    torch.set_num_threads(job.threads)
    config = ModelConfig.from_json(job.config_json)
    latent = initial_latent(
        job.seed, height=job.height, width=job.width, latent_factor=config.latent_factor, multiple=config.size_multiple
    )
    run = _diffusers_run(job, config, latent) if job.scheme == "diffusers" else _our_run(job, config, latent)
    before = reset_peak(job.device)
    start = time.perf_counter()
    images = run()
    seconds = time.perf_counter() - start
    extra = max(0, peak(job.device) - before)
    return {"scheme": job.scheme, "seconds": seconds, "peak_extra_bytes": extra, "images": np.asarray(images)}


def checkpoint_config(path: Path) -> ModelConfig:
    """The ModelConfig in a file's metadata (files written by `save_checkpoint`); other files need model=<preset>."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types
        raise UserError(f"cannot read {path} as safetensors ({err})") from err
    if CONFIG_METADATA_KEY not in metadata:
        raise UserError(f"{path} holds no model config; name its architecture with model=sd15 or model=sdxl")
    return ModelConfig.from_json(metadata[CONFIG_METADATA_KEY])


def write_random_checkpoint(name: str, path: str) -> str:
    """Preset `name`'s architecture with random weights, saved in the original layout (in its own process)."""
    save_checkpoint(random_model(name, weights_dtype=RANDOM_FILE_DTYPE), path, dtype=RANDOM_FILE_DTYPE)
    return path


def _fresh_processes() -> ProcessPoolExecutor:
    # one task per process: every run starts from a fresh interpreter (spawn, not fork of a loaded parent)
    return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1)


def random_checkpoint(name: str, path: Path) -> Path:
    with _fresh_processes() as pool:
        return Path(pool.submit(write_random_checkpoint, name, str(path)).result())


def side_by_side(
    checkpoint: Path,
    *,
    config: ModelConfig,
    prompts: list[str],
    settings: SamplerSettings,
    height: int,
    width: int,
    seed: int = 0,
    negative_prompt: str = "",
    dtype: str = "fp32",
    device: str = "cpu",
    threads: int | None = None,
    repeats: int = 3,
) -> list[list[dict]]:
    """`repeats` rounds of the four schemes (interleaved), each run in a fresh process; results[r][i] is round r's
    run of SIDE_BY_SIDE[i]."""
    from p2p.experiments.diffusers_pipeline import check_supported  # needs '.[bench]'

    check_supported(config)
    config.check_image_size(height=height, width=width)
    common = dict(
        checkpoint=str(checkpoint),
        config_json=config.to_json(),
        prompts=tuple(prompts),
        negative_prompt=negative_prompt,
        seed=seed,
        steps=settings.steps,
        guidance=settings.guidance,
        height=height,
        width=width,
        dtype=dtype,
        device=device,
        threads=threads or torch.get_num_threads(),
    )
    rounds = []
    for _ in range(repeats):
        rounds.append([])
        for scheme in SIDE_BY_SIDE:
            with _fresh_processes() as pool:
                rounds[-1].append(pool.submit(run_job, Job(scheme=scheme, **common)).result())
    return rounds


def ratios(rounds: list[list[dict]], numerator: str, denominator: str, key: str) -> list[float]:
    """The ratio of two schemes' `key` ("seconds" or "peak_extra_bytes") within each round."""
    index = {scheme: i for i, scheme in enumerate(SIDE_BY_SIDE)}
    return [r[index[numerator]][key] / max(r[index[denominator]][key], 1e-9) for r in rounds]


def pixel_difference(rounds: list[list[dict]]) -> float:
    """The largest |(2) − (1)| over every pixel of every round, out of 255: the same weights and settings."""
    return max(float(np.abs(r[1]["images"].astype(np.float64) - r[0]["images"]).max()) for r in rounds)


def _spread(values: list[float], fmt: str) -> str:
    return " / ".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


def summary(rounds: list[list[dict]]) -> dict:
    """The measurements without the images (for a JSON file): per round, per scheme; and the pixel difference."""
    drop = lambda run: {k: v for k, v in run.items() if k != "images"}  # noqa: E731
    return {"rounds": [[drop(run) for run in r] for r in rounds], "max_pixel_difference": pixel_difference(rounds)}


def report(rounds: list[list[dict]], *, header: str) -> str:
    """Per scheme and per ratio: min / median / max over the rounds."""
    lines = [header, f"  {'scheme':<32} {'time s (min / median / max)':<30} peak extra MiB (min / median / max)"]
    for i, scheme in enumerate(SIDE_BY_SIDE):
        seconds = [r[i]["seconds"] for r in rounds]
        mib = [r[i]["peak_extra_bytes"] / MIB for r in rounds]
        lines.append(f"  {LABELS[scheme]:<32} {_spread(seconds, '.2f'):<30} {_spread(mib, '.1f')}")
    lines.append(f"  {'ratio':<32} {'time (min / median / max)':<30} {'memory (min / median / max)':<36} target")
    for numerator, denominator, target in RATIOS:
        name = f"{LABELS[numerator][:3]}/{LABELS[denominator][:3]}"
        time_ratios = ratios(rounds, numerator, denominator, "seconds")
        memory_ratios = ratios(rounds, numerator, denominator, "peak_extra_bytes")
        lines.append(f"  {name:<32} {_spread(time_ratios, '.3f'):<30} {_spread(memory_ratios, '.3f'):<36} {target}")
    lines.append(
        f"  (2) vs (1) images: max pixel difference {pixel_difference(rounds):.2f}/255 over {len(rounds)} rounds"
    )
    return "\n".join(lines)
