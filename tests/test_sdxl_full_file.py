"""A full-size SDXL base 1.0 file (every name and shape of keys_sdxl.txt + extras, random fp16 values, 6.5 GiB)
loads strictly into fp16 storage and runs in fp32 without ever holding a second copy of the weights.

The file is written tensor by tensor (p2p.experiments.random_files), so writing it never holds the model either.
The load and one forward of every part run in a child process whose anonymous memory (RssAnon: the file's mmapped pages aside) is sampled every 20 ms; its peak
total RSS (VmHWM, file pages included) shows there is one copy of the weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from PIL import Image

from p2p.experiments.random_files import read_key_list, write_random_file

PARAMETERS = 3_468_000_000  # ~3.47 B tensor elements in sd_xl_base_1.0.safetensors (checked below)


CHILD = textwrap.dedent("""
    import sys, threading, time, json
    import torch
    from models.loader import load_checkpoint

    peak = {"anon": 0}
    def status(field):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))
    def sample():
        while True:
            peak["anon"] = max(peak["anon"], status("RssAnon:"))
            time.sleep(0.02)
    threading.Thread(target=sample, daemon=True).start()

    model = load_checkpoint(sys.argv[1], weights_dtype="fp16", dtype="fp32")
    time.sleep(0.1)
    loaded, loaded_total = peak["anon"], status("VmHWM:")
    with torch.no_grad():
        text = model.encode_text(["a photo of a cat", ""])
        y = model.added_conditioning(text.pooled, height=64, width=64)
        eps = model.unet(torch.randn(2, 4, 8, 8), 981, text.context, y=y)
        image = model.decode_latents(eps[:1])
    time.sleep(0.1)
    print(json.dumps({"loaded": loaded, "ran": peak["anon"], "loaded_total": loaded_total, "ran_total": status("VmHWM:"),
                      "model": model.config.name,
                      "weights": str(model.weights_dtype), "compute": str(model.dtype),
                      "shapes": [list(text.context.shape), list(text.pooled.shape), list(y.shape), list(image.shape)],
                      "finite": bool(torch.isfinite(image).all() and torch.isfinite(eps).all())}))
""")


@pytest.fixture(scope="module")
def full_sdxl_file(sd_keys_dir, tmp_path_factory) -> Path:
    """Every name and shape of sd_xl_base_1.0.safetensors (+ the extras), random fp16 values, 6.5 GiB."""
    shapes = {**read_key_list(sd_keys_dir / "keys_sdxl.txt"), **read_key_list(sd_keys_dir / "keys_sdxl_extras.txt")}
    path = tmp_path_factory.mktemp("sdxl") / "sd_xl_base_1.0.safetensors"
    elements = write_random_file(path, shapes, dtype=torch.float16)
    assert abs(elements - PARAMETERS) < 0.01 * PARAMETERS, elements
    return path


@pytest.mark.slow
def test_full_sdxl_file_loads_in_fp16_and_runs_in_fp32_with_one_copy(full_sdxl_file):
    path = full_sdxl_file
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    file_bytes = path.stat().st_size
    gib = lambda key: f"{report[key] / 2**30:.2f}"
    print(
        f"SDXL fp16 file {file_bytes / 2**30:.2f} GiB. Peak RssAnon {gib('loaded')} GiB after loading, {gib('ran')} "
        f"GiB after a text + UNet + VAE forward; peak RSS (file pages included) {gib('loaded_total')} / "
        f"{gib('ran_total')} GiB"
    )
    assert report["model"] == "sdxl" and report["weights"] == "torch.float16" and report["compute"] == "torch.float32"
    assert report["shapes"] == [[2, 77, 2048], [2, 1280], [2, 2816], [1, 3, 64, 64]] and report["finite"]
    # one copy of the weights (safetensors maps fp16 tensors from the file: they show as file pages, not RssAnon)
    # plus the interpreter and libraries (~0.5 GiB); two copies would be twice the file
    assert report["loaded_total"] < file_bytes + 1.0 * 2**30
    # fp32 weights exist one layer at a time during the forward, never the whole model's (that would be +13 GiB)
    assert report["ran_total"] < file_bytes + 1.5 * 2**30 and report["ran"] < 1.5 * 2**30


@pytest.mark.slow
def test_generate_script_on_a_full_sdxl_file_gives_diffusers_image(full_sdxl_file, tmp_path):
    """`generate.py model=sdxl` (fp16 storage, fp32 compute) on the released layout = StableDiffusionXLPipeline with
    DDIMScheduler and the same seed, within 2/255. Small size and 2 steps: the full network, at CPU cost."""
    from test_sdxl_pipeline import GUIDANCE, MAX_PIXEL_DIFF, PROMPT, SEED, diffusers_sdxl_pipeline_from_ours

    from models.loader import load_checkpoint

    height, width, steps = 128, 192, 2
    done = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "generate.py"),
            "model=sdxl",
            f"model.checkpoint={full_sdxl_file}",
            f'prompts=["{PROMPT}"]',
            f"seed={SEED}",
            f"steps={steps}",
            f"guidance={GUIDANCE}",
            f"height={height}",
            f"width={width}",
            "weights_dtype=fp16",
            "dtype=fp32",
            "progress=false",
            f"hydra.run.dir={tmp_path}/run",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    ours = np.asarray(Image.open(next((tmp_path / "run").glob("00_*.png"))), dtype=np.float64)
    # the file's fp16 values in fp32: diffusers computes in fp32 on exactly the weights generate.py used
    pipe = diffusers_sdxl_pipeline_from_ours(load_checkpoint(full_sdxl_file, dtype="fp32"), tmp_path)
    pipe.set_progress_bar_config(disable=True)
    expected = (
        255
        * pipe(
            PROMPT,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type="np",
        ).images[0]
    )
    diff = np.abs(ours - expected).max()
    print(f"full-size SDXL generate.py vs diffusers: max pixel diff {diff:.3f}/255 (image std {expected.std():.1f})")
    assert ours.shape == expected.shape == (height, width, 3)
    assert expected.std() > 5, "degenerate reference image: the comparison would prove little"
    assert diff <= MAX_PIXEL_DIFF
