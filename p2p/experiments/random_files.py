"""Full-size checkpoint files of random weights, written from a key list, for memory and speed measurements.

No real weights can be downloaded here, but a file with every name and shape of a released checkpoint
(../shared/sd-keys/keys_*.txt: `name<TAB>[shape]` per line, `#` lines are the list's header) loads through exactly
the code a user's file does, so its peak memory is the user's. The file is written one tensor at a time in
safetensors' own layout (an 8-byte little-endian header length, a JSON header padded to 8 bytes, the raw bytes),
so writing a 16 GB file never holds more than its largest tensor.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from models.errors import MissingFileError, UserError
from models.files import atomic_path

NORM_SPREAD = 0.1  # norm scales 1 + 0.1·N(0, 1), biases 0.1·N(0, 1): a dropped or swapped one shows in outputs
SAFETENSORS_CODES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}
# extras that real files store in another dtype (an arange and fp32 schedule buffers)
INTEGER_KEYS = ("position_ids",)
FLOAT32_KEYS = ("denoiser.sigmas", "model_sampling.sigmas", "logit_scale")


def read_key_list(path: str | Path) -> dict[str, tuple[int, ...]]:
    """`name<TAB>[shape]` per line, as in ../shared/sd-keys/; lines starting with '#' are the list's header."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"key list {str(path)!r} does not exist")
    shapes = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        name, _, shape = line.partition("\t")
        try:
            shapes[name] = tuple(json.loads(shape))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: expected 'name<TAB>[shape]', got {line[:80]!r}") from err
    return shapes


def _dtype_of(name: str, dtype: torch.dtype) -> torch.dtype:
    if name.endswith(INTEGER_KEYS):
        return torch.int64
    return torch.float32 if name.endswith(FLOAT32_KEYS) else dtype


def random_tensor(name: str, shape: tuple[int, ...], *, generator: torch.Generator) -> torch.Tensor:
    """fp32 values for one tensor: matrices and kernels U(±1/√fan_in) (PyTorch's Linear/Conv scale, so activations
    stay O(1) through full-depth networks and images are not saturated), norm scales near 1, biases near 0."""
    if len(shape) >= 2:
        bound = torch.Size(shape[1:]).numel() ** -0.5
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)
    spread = torch.randn(shape, generator=generator) * NORM_SPREAD
    return spread + 1.0 if name.endswith("weight") else spread


def write_random_file(
    path: str | Path, shapes: dict[str, tuple[int, ...]], *, dtype: torch.dtype = torch.float16, seed: int = 0
) -> int:
    """Write `random_tensor`s of `shapes` to a safetensors file at `path`; returns the weight element count."""
    header, offset, elements = {}, 0, 0
    for name, shape in shapes.items():
        kind = _dtype_of(name, dtype)
        size = kind.itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": SAFETENSORS_CODES[kind], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
        elements += int(torch.Size(shape).numel()) if kind == dtype else 0
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    generator = torch.Generator().manual_seed(seed)
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, shape in shapes.items():
            kind = _dtype_of(name, dtype)
            if kind == torch.int64:  # position ids: an arange over the last axis, as real files hold
                tensor = torch.arange(shape[-1]).expand(shape).contiguous()
            else:
                tensor = random_tensor(name, shape, generator=generator).to(kind)
            file.write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # (0-d tensors cannot be viewed)
    return elements
