"""Shared test fixtures: the `slow` marker, seeded random weights, and the shared SD key lists."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: full-size SD 1.5 / 2.1 shapes on the CPU (seconds to a minute each); "
        "still part of the default run, deselect with -m 'not slow'",
    )


@pytest.fixture(autouse=True)
def one_thread_for_small_tensors(request):
    """Tests on tiny models run on one thread: at these sizes a second thread costs more than it saves, and
    under load two contending threads were measured ~100× slower. Full-size (`slow`) tests keep the default."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize_(module: nn.Module, *, seed: int) -> nn.Module:
    """Fill every parameter from a seeded generator, in `named_parameters` order.

    Matrices/kernels: U(±1/sqrt(fan_in)) (PyTorch's Linear/Conv scale, so activations stay O(1) through
    the full-size networks). Vectors named `weight` (norm scales): 1 + 0.1·N(0, 1); other vectors (biases):
    0.1·N(0, 1). Unlike PyTorch's defaults (norm weight 1, bias 0) this makes a swapped or dropped norm or bias
    show up in an output comparison.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                bound = p[0].numel() ** -0.5
                p.uniform_(-bound, bound, generator=generator)
            elif name.endswith("weight"):
                p.normal_(generator=generator).mul_(0.1).add_(1.0)
            else:
                p.normal_(generator=generator).mul_(0.1)
    return module


@pytest.fixture(scope="session")
def randomize() -> Callable[..., nn.Module]:
    """`randomize(module, seed=0)`: see `randomize_`."""
    return randomize_


@pytest.fixture(scope="session")
def random_model() -> Callable[..., nn.Module]:
    """`random_model(factory, seed=0)`: build `factory()` on the meta device, allocate it, `randomize_` it.

    Skips PyTorch's own initialisation, which would be overwritten anyway (seconds for an 860 M UNet).
    Only for modules without buffers (ours, diffusers' UNet/VAE): `to_empty` leaves buffers uninitialised.
    """

    def build(factory: Callable[[], nn.Module], *, seed: int = 0) -> nn.Module:
        with torch.device("meta"):
            module = factory()
        if any(True for _ in module.buffers()):
            raise ValueError(f"{type(module).__name__} has buffers; build it normally and call randomize_")
        return randomize_(module.to_empty(device="cpu"), seed=seed).eval().requires_grad_(False)

    return build


@pytest.fixture(scope="session")
def sd_keys_dir() -> Path:
    """The key lists of the real SD checkpoints (every tensor name and shape of SD 1.5 and SD 2.1 files):
    `$P2P_SHARED_DIR/sd-keys` when set, else the copy in tests/data/sd-keys (so a clean clone tests them too)."""
    shared = os.environ.get("P2P_SHARED_DIR")
    keys_dir = Path(shared) / "sd-keys" if shared else REPO_ROOT / "tests" / "data" / "sd-keys"
    if not (keys_dir / "keys_sd15.txt").is_file():
        pytest.skip(f"SD key lists not found in {keys_dir} (set P2P_SHARED_DIR to the folder holding sd-keys/)")
    return keys_dir
