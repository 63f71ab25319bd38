"""A full-size SDXL base 1.0 file (every name and shape of keys_sdxl.txt + extras, random fp16 values, 6.5 GiB)
loads strictly into fp16 storage and runs in fp32 without ever holding a second copy of the weights.

The file is written tensor by tensor (safetensors' layout by hand: an 8-byte header length, a JSON header, the
raw bytes), so writing it never holds the model either. The load and one forward of every part run in a child
process whose anonymous memory (RssAnon: the file's mmapped pages aside) is sampled every 20 ms; its peak
total RSS (VmHWM, file pages included) shows there is one copy of the weights.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO_ROOT
from test_sdxl_model import read_key_list

PARAMETERS = 3_468_000_000  # ~3.47 B tensor elements in sd_xl_base_1.0.safetensors (checked below)


# real files store these two extras as int64 (an arange) and fp32; every weight is fp16
EXTRA_DTYPES = {
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": ("I64", torch.int64),
    "denoiser.sigmas": ("F32", torch.float32),
}


def write_random_fp16_file(path, shapes: dict[str, tuple[int, ...]]) -> int:
    """safetensors file of N(0, 0.02²) fp16 tensors, written one tensor at a time; returns the fp16 element count."""
    header, offset, elements = {}, 0, 0
    for name, shape in shapes.items():
        code, dtype = EXTRA_DTYPES.get(name, ("F16", torch.float16))
        size = dtype.itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
        elements += int(torch.Size(shape).numel()) if code == "F16" else 0
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8 bytes
    generator = torch.Generator().manual_seed(0)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, shape in shapes.items():
            dtype = EXTRA_DTYPES.get(name, ("F16", torch.float16))[1]
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
            file.write(tensor.numpy().tobytes())
    return elements


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


@pytest.mark.slow
def test_full_sdxl_file_loads_in_fp16_and_runs_in_fp32_with_one_copy(sd_keys_dir, tmp_path):
    shapes = {**read_key_list(sd_keys_dir / "keys_sdxl.txt"), **read_key_list(sd_keys_dir / "keys_sdxl_extras.txt")}
    path = tmp_path / "sd_xl_base_1.0.safetensors"
    elements = write_random_fp16_file(path, shapes)
    assert abs(elements - PARAMETERS) < 0.01 * PARAMETERS, elements
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
