"""PIE-Bench's metrics, as its evaluation computes them (Ju et al. 2023, §5 and its evaluation/evaluate.py).

Every metric compares the source photo with the edited image:
- background preservation on the unedited region: PSNR, MSE, SSIM, LPIPS. The benchmark multiplies *both* images
  by (1 − mask) and scores the whole images, so the edited region counts as identical pixels (it lowers MSE and
  raises PSNR by the masked fraction). We do the same, with torchmetrics (PSNR and SSIM with data_range 1 on
  [0, 1] images, MSE on [0, 1], LPIPS-SqueezeNet on [-1, 1]), so our numbers sit beside the published ones;
- structure distance (Tumanyan et al. 2022, "Splicing ViT features", §3.2): the MSE between the cosine
  self-similarity matrices of the keys of DINO ViT-B/8's last layer, of the two whole images. As in the
  benchmark, the images enter as 0–255 floats (no /255) before ImageNet normalisation, resized to 224;
- CLIP similarity (CLIPScore, ViT-L/14) of the edited image with the target prompt, whole and with everything
  outside the edit mask set to 0.

LPIPS, DINO and CLIP need pretrained weights, which are not downloaded here: `NetworkPaths` names the local files,
and a metric whose file is not given is skipped (`MetricSet.skipped` says which file each needs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.functional.regression import mean_squared_error

from models.errors import MissingFileError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # DINO's input normalisation
DINO_SIZE = 224  # the benchmark resizes the shorter side to 224 (max 480) before DINO
DINO_ARCH = "vit_base_patch8_224"  # timm's name for DINO ViT-B/8; the same parameter names as DINO's checkpoint
BACKGROUND_METRICS = ("psnr", "mse", "ssim", "lpips")  # on the unedited region
METRICS = ("structure_distance", "psnr", "lpips", "mse", "ssim", "clip_whole", "clip_edited")


@dataclass
class NetworkPaths:
    """Local weights of the metrics' networks; None = that metric is skipped."""

    lpips: str | None = None  # torchvision squeezenet1_1 state dict (squeezenet1_1-b8a52dc0.pth), LPIPS' backbone
    dino: str | None = None  # DINO ViT-B/8 state dict (dino_vitb8_pretrain.pth) or .safetensors
    clip: str | None = None  # a Hugging Face CLIP folder (config + weights + processor), e.g. clip-vit-large-patch14
    dino_arch: str = DINO_ARCH  # timm architecture the DINO weights fit


NEEDS = {
    "lpips": "metrics.lpips=PATH/squeezenet1_1-b8a52dc0.pth (torchvision's SqueezeNet 1.1 weights)",
    "structure_distance": "metrics.dino=PATH/dino_vitb8_pretrain.pth (DINO ViT-B/8, facebookresearch/dino)",
    "clip_whole": "metrics.clip=PATH/clip-vit-large-patch14/ (a Hugging Face CLIP folder)",
    "clip_edited": "metrics.clip=PATH/clip-vit-large-patch14/ (a Hugging Face CLIP folder)",
}


def _to_unit(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) → float (1, 3, H, W) in [0, 1], as the benchmark's calculators take them."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None].contiguous()


def _masked_pair(source: np.ndarray, edited: np.ndarray, keep: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.from_numpy(np.asarray(keep, dtype=np.float32))[None, None]
    return _to_unit(source) * keep, _to_unit(edited) * keep


def psnr_unedited(source: np.ndarray, edited: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB, data range 1) of the two images with the edit `mask` (1 = edited) zeroed in both."""
    a, b = _masked_pair(source, edited, 1 - mask)
    return float(peak_signal_noise_ratio(a, b, data_range=1.0))


def mse_unedited(source: np.ndarray, edited: np.ndarray, mask: np.ndarray) -> float:
    a, b = _masked_pair(source, edited, 1 - mask)
    return float(mean_squared_error(a, b))


def ssim_unedited(source: np.ndarray, edited: np.ndarray, mask: np.ndarray) -> float:
    """SSIM (Wang et al. 2004: Gaussian window 11, σ 1.5, data range 1) of the masked images."""
    a, b = _masked_pair(source, edited, 1 - mask)
    return float(structural_similarity_index_measure(a, b, data_range=1.0))


def load_lpips(path: str | Path) -> torch.nn.Module:
    """torchmetrics' LPIPS network (SqueezeNet) with its bundled linear layers and the backbone from `path`."""
    from torchmetrics.functional.image.lpips import _LPIPS
    from torchvision.models import squeezenet1_1

    backbone = squeezenet1_1()
    backbone.load_state_dict(_load_state_dict(path))
    net = _LPIPS(pretrained=True, net="squeeze", pnet_rand=True)  # the linear layers ship with torchmetrics
    for part in net.net.slices:  # the slices hold features[i] under the name "i"
        for index, module in part.named_children():
            module.load_state_dict(backbone.features[int(index)].state_dict())
    return net.eval()


def lpips_unedited(net: torch.nn.Module, source: np.ndarray, edited: np.ndarray, mask: np.ndarray) -> float:
    a, b = _masked_pair(source, edited, 1 - mask)
    with torch.no_grad():
        return float(net(a * 2 - 1, b * 2 - 1).squeeze())


def load_dino(path: str | Path, *, arch: str = DINO_ARCH, **overrides) -> torch.nn.Module:
    """DINO ViT from a local state dict, built as timm's `arch` (no head); `overrides` size a test's tiny ViT."""
    import timm

    model = timm.create_model(arch, pretrained=False, num_classes=0, **overrides)
    model.load_state_dict(_load_state_dict(path))
    return model.eval()


def last_keys_self_similarity(dino: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """(tokens, tokens) cosine similarity of the last block's attention keys, heads concatenated (Tumanyan §3.2)."""
    captured = []
    block = dino.blocks[-1]
    handle = block.attn.qkv.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        with torch.no_grad():
            dino(image)
    finally:
        handle.remove()
    qkv = captured[0][0]  # (tokens, 3 · heads · d)
    tokens, heads = qkv.shape[0], block.attn.num_heads
    keys = qkv.reshape(tokens, 3, heads, -1)[:, 1].reshape(tokens, -1)  # (tokens, heads · d)
    return F.cosine_similarity(keys[:, None, :], keys[None, :, :], dim=-1, eps=1e-8)


def dino_input(image: np.ndarray, *, size: int = DINO_SIZE) -> torch.Tensor:
    """The benchmark's DINO input: 0–255 floats (its evaluation never divides by 255), shorter side → `size`
    (bilinear, as torchvision's Resize on tensors), then ImageNet normalisation."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    height, width = x.shape[-2:]
    scale = size / min(height, width)
    x = F.interpolate(
        x, size=(round(height * scale), round(width * scale)), mode="bilinear", align_corners=False, antialias=True
    )
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (x - mean) / std


def structure_distance(dino: torch.nn.Module, source: np.ndarray, edited: np.ndarray) -> float:
    return float(
        F.mse_loss(
            last_keys_self_similarity(dino, dino_input(edited)), last_keys_self_similarity(dino, dino_input(source))
        )
    )


def load_clip_score(path: str | Path):
    """torchmetrics' CLIPScore on a local Hugging Face CLIP folder (no download)."""
    from torchmetrics.multimodal import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise MissingFileError(
            f"metrics.clip={str(path)!r} is not a folder; pass a Hugging Face CLIP folder "
            "(config.json, weights, tokenizer and preprocessor files)"
        )

    class FeatureCLIP(CLIPModel):
        """transformers ≥ 5 returns an output object from get_*_features (the projected embedding is its
        pooler_output); torchmetrics 1.9's CLIPScore expects the tensor."""

        def get_image_features(self, *args, **kwargs):
            out = super().get_image_features(*args, **kwargs)
            return getattr(out, "pooler_output", out)

        def get_text_features(self, *args, **kwargs):
            out = super().get_text_features(*args, **kwargs)
            return getattr(out, "pooler_output", out)

    return CLIPScore(
        model_name_or_path=lambda: (
            FeatureCLIP.from_pretrained(str(folder)).eval(),
            CLIPProcessor.from_pretrained(str(folder)),
        )
    )


def clip_similarity(scorer, image: np.ndarray, prompt: str, mask: np.ndarray | None = None) -> float:
    """100 · max(cos(image, text), 0); with `mask`, the pixels outside it are 0 first (the benchmark's edit part)."""
    if mask is not None:
        image = np.uint8(np.asarray(image) * np.asarray(mask)[..., None])
    scorer.reset()
    with torch.no_grad():
        return float(scorer(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), prompt))


def _load_state_dict(path: str | Path) -> dict:
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(
            f"metric weights {str(path)!r} do not exist; pass the file's path (see "
            "docs/benchmarks-pie.md, 'Metric weights')"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


class MetricSet:
    """The benchmark's metrics with the networks the user gave; `skipped` lists (metric, what it needs)."""

    def __init__(self, paths: NetworkPaths | None = None):
        paths = paths or NetworkPaths()
        self.lpips = load_lpips(paths.lpips) if paths.lpips else None
        self.dino = load_dino(paths.dino, arch=paths.dino_arch) if paths.dino else None
        self.clip = load_clip_score(paths.clip) if paths.clip else None
        present = {
            "lpips": self.lpips,
            "structure_distance": self.dino,
            "clip_whole": self.clip,
            "clip_edited": self.clip,
        }
        self.skipped = [(name, NEEDS[name]) for name, net in present.items() if net is None]
        self.columns = [m for m in METRICS if m not in dict(self.skipped)]

    def skipped_line(self) -> str:
        """One line: each skipped metric and the file it needs ("" when none is skipped)."""
        needs: dict[str, list[str]] = {}
        for name, need in self.skipped:
            needs.setdefault(need, []).append(name)
        return "; ".join(f"{' and '.join(names)} need {need}" for need, names in needs.items())

    def __call__(self, source: np.ndarray, edited: np.ndarray, mask: np.ndarray, target_prompt: str) -> dict:
        """Every available metric of one entry; NaN for the background ones when the mask covers everything."""
        row: dict[str, float] = {}
        if self.dino is not None:
            row["structure_distance"] = structure_distance(self.dino, source, edited)
        unedited = (1 - mask).sum() > 0  # the benchmark reports "nan" when nothing is left unedited
        measures: dict[str, Callable] = {"psnr": psnr_unedited, "mse": mse_unedited, "ssim": ssim_unedited}
        if self.lpips is not None:
            measures["lpips"] = lambda a, b, m: lpips_unedited(self.lpips, a, b, m)
        for name, measure in measures.items():
            row[name] = measure(source, edited, mask) if unedited else float("nan")
        if self.clip is not None:
            row["clip_whole"] = clip_similarity(self.clip, edited, target_prompt)
            row["clip_edited"] = clip_similarity(self.clip, edited, target_prompt, mask) if mask.sum() else float("nan")
        return {m: row[m] for m in METRICS if m in row}
