"""Issue 27: PIE-Bench's metric definitions, pinned against independent computations.

PSNR / MSE / SSIM on the unedited region are torchmetrics' here; the tests recompute them in numpy the way the
benchmark defines them (both images × (1 − mask), then the whole image). The networks (LPIPS' SqueezeNet, DINO
ViT, CLIP) are tiny or randomly initialised and saved to files in the test: never downloaded.
"""

import gzip
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from p2p.experiments.pie_metrics import (
    MetricSet,
    NetworkPaths,
    clip_similarity,
    dino_input,
    load_clip_score,
    load_dino,
    load_lpips,
    lpips_unedited,
    mse_unedited,
    psnr_unedited,
    ssim_unedited,
    structure_distance,
)


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    edited = np.clip(source.astype(int) + rng.integers(-40, 41, source.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((32, 32))
    mask[8:20, 10:24] = 1
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1  # the benchmark's border
    return source, edited, mask


def masked_unit(image, mask):
    return image.astype(np.float64) / 255 * (1 - mask)[..., None]


def test_psnr_and_mse_are_the_benchmarks_masked_whole_image_definitions(pair):
    source, edited, mask = pair
    mse = np.mean((masked_unit(source, mask) - masked_unit(edited, mask)) ** 2)  # edited region: 0 − 0
    assert mse_unedited(source, edited, mask) == pytest.approx(mse, rel=1e-5)
    assert psnr_unedited(source, edited, mask) == pytest.approx(10 * np.log10(1 / mse), abs=1e-4)
    assert psnr_unedited(source, source, mask) == float("inf") or psnr_unedited(source, source, mask) > 100


def gaussian_ssim(a, b, *, size=11, sigma=1.5, data_range=1.0):
    """Wang et al. 2004 SSIM, written out: Gaussian-weighted local statistics around every pixel, the image
    reflect-padded by half a window (as torchmetrics, hence the benchmark, averages: over the whole image)."""
    pad = (size - 1) // 2
    a = np.pad(a, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    b = np.pad(b, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    window = np.outer(g / g.sum(), g / g.sum())
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for channel in range(a.shape[-1]):
        p, q = a[..., channel], b[..., channel]
        rows, cols = p.shape[0] - size + 1, p.shape[1] - size + 1
        for i in range(rows):
            for j in range(cols):
                wp, wq = p[i : i + size, j : j + size], q[i : i + size, j : j + size]
                mp, mq = (window * wp).sum(), (window * wq).sum()
                vp, vq = max((window * wp**2).sum() - mp**2, 0), max((window * wq**2).sum() - mq**2, 0)
                cov = (window * wp * wq).sum() - mp * mq
                values.append(((2 * mp * mq + c1) * (2 * cov + c2)) / ((mp**2 + mq**2 + c1) * (vp + vq + c2)))
    return float(np.mean(values))


def test_ssim_is_wang_et_al_on_the_masked_images(pair):
    source, edited, mask = pair
    expected = gaussian_ssim(masked_unit(source, mask), masked_unit(edited, mask))
    assert ssim_unedited(source, edited, mask) == pytest.approx(expected, abs=1e-4)


def test_lpips_with_a_local_backbone_equals_torchmetrics_loading_it_the_usual_way(pair, tmp_path, monkeypatch):
    from torchvision.models import squeezenet1_1

    torch.manual_seed(0)
    weights = tmp_path / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth"  # torchvision's file name
    weights.parent.mkdir(parents=True)
    torch.save(squeezenet1_1().state_dict(), weights)
    source, edited, mask = pair
    ours = lpips_unedited(load_lpips(weights), source, edited, mask)
    # independently: torchmetrics' own LPIPS metric, finding the same backbone in torch's download cache
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    reference = LearnedPerceptualImagePatchSimilarity(net_type="squeeze")
    a = torch.from_numpy(masked_unit(source, mask)).float().permute(2, 0, 1)[None]
    b = torch.from_numpy(masked_unit(edited, mask)).float().permute(2, 0, 1)[None]
    assert ours == pytest.approx(float(reference(a * 2 - 1, b * 2 - 1)), rel=1e-5)
    assert ours > 0 and lpips_unedited(load_lpips(weights), source, source, mask) == pytest.approx(0, abs=1e-6)


TINY_VIT = dict(embed_dim=48, depth=2, num_heads=3)  # DINO ViT-B/8's layout (patch 8, 224 px), tiny widths


def test_structure_distance_is_the_mse_of_last_layer_key_self_similarities(pair, tmp_path):
    import timm
    from safetensors.torch import save_file
    from torchvision import transforms

    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch8_224", pretrained=False, num_classes=0, **TINY_VIT)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, tmp_path / "dino.safetensors")
    dino = load_dino(tmp_path / "dino.safetensors", **TINY_VIT)
    source, edited, _ = pair

    def self_similarity(image):  # written out: tokens → blocks but the last → the last block's keys
        x = transforms.Compose(
            [
                transforms.Resize(224, max_size=480),  # the benchmark's transform, 0–255 input
                transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            ]
        )(torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1))[None]
        with torch.no_grad():
            tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
            for block in vit.blocks[:-1]:
                tokens = block(tokens)
            last = vit.blocks[-1]
            qkv = last.attn.qkv(last.norm1(tokens))[0]  # (785, 3 · 48)
        keys = qkv.reshape(qkv.shape[0], 3, 3, 16)[:, 1].reshape(qkv.shape[0], 48)
        unit = keys / keys.norm(dim=1, keepdim=True)
        return unit @ unit.T

    assert torch.allclose(
        dino_input(source),
        transforms.Resize(224, max_size=480)(torch.from_numpy(source.astype(np.float32)).permute(2, 0, 1))[None]
        .sub(torch.tensor((0.485, 0.456, 0.406))[:, None, None])
        .div(torch.tensor((0.229, 0.224, 0.225))[:, None, None]),
        atol=1e-3,
    )
    expected = F.mse_loss(self_similarity(edited), self_similarity(source)).item()
    assert structure_distance(dino, source, edited) == pytest.approx(expected, rel=1e-4, abs=1e-9)
    assert structure_distance(dino, source, source) == 0


def tiny_clip_folder(folder):
    """A randomly initialised CLIP in Hugging Face's layout, with CLIP's real BPE (bundled with open_clip)."""
    from open_clip.tokenizer import SimpleTokenizer, default_bpe
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPTokenizer,
        CLIPVisionConfig,
    )

    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (folder / "vocab.json").write_text(json.dumps({renamed.get(t, t): i for t, i in SimpleTokenizer().encoder.items()}))
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=CLIPTextConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        ).to_dict(),
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=224,
            patch_size=32,
        ).to_dict(),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(
        image_processor=CLIPImageProcessor(), tokenizer=CLIPTokenizer.from_pretrained(str(folder))
    ).save_pretrained(folder)
    return folder


def test_clip_similarity_is_clipscore_of_the_whole_and_of_the_masked_image(pair, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    folder = tiny_clip_folder(tmp_path)
    scorer = load_clip_score(folder)
    model, processor = CLIPModel.from_pretrained(str(folder)), CLIPProcessor.from_pretrained(str(folder))
    _, edited, mask = pair
    prompt = "a blue circle on a black background"

    def expected(image):  # 100 · max(cos, 0) of the model's own projected embeddings (its full forward)
        inputs = processor(text=[prompt], images=[image], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.eval()(**inputs)
        return max(100 * F.cosine_similarity(out.image_embeds, out.text_embeds).item(), 0.0)

    assert clip_similarity(scorer, edited, prompt) == pytest.approx(expected(edited), abs=1e-3)
    masked = np.uint8(edited * mask[..., None])  # the benchmark's edited part: 0 outside the mask
    assert clip_similarity(scorer, edited, prompt, mask) == pytest.approx(expected(masked), abs=1e-3)


def test_metrics_without_weights_are_skipped_with_one_line_naming_each_file(pair):
    metrics = MetricSet(NetworkPaths())
    line = metrics.skipped_line()
    assert "squeezenet1_1" in line and "dino_vitb8" in line and "clip" in line and "\n" not in line
    source, edited, mask = pair
    row = metrics(source, edited, mask, "a prompt")
    assert set(row) == {"psnr", "mse", "ssim"} and all(np.isfinite(list(row.values())))
    everything = np.ones((32, 32))  # nothing left unedited: NaN, as the benchmark's "nan"
    assert all(np.isnan(v) for v in metrics(source, edited, everything, "a prompt").values())
