# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3 · Refine, reweight, LocalBlend, object preservation
#
# Word swap (notebook 2) is one of several edits the paper builds from the same idea — control the target's
# attention maps with the source's. Each one below is **one line of config** (an `EditSpec` or a `BlendSpec`,
# the schemas of the scripts' `edit=` and `blend=` config groups), run through the same `edit` call and the
# same controllers as `scripts/edit.py`, and compared with plain same-seed sampling.
#
# A warning before the pictures: notebook 1 showed that in this tiny model most of the cross-attention goes
# to the padding tokens, which summarise the whole prompt (about a third of it even on the object), and each word's
# own column holds from 1% (`red`) to a fifth. Edits that act on one word's column are therefore weaker here than in the paper's SD
# results, and depend on which word; the sections below say what they do on this model and measure it.

# %% [markdown]
# ## The built-in model
#
# `models/weights/tiny.safetensors` is a ~13 M-parameter Stable Diffusion (same UNet, VAE, text encoder and DDIM
# sampler as SD, only smaller) trained on the *shapes world*: 32×32 images of one or two colored shapes with
# captions like "a red circle and a blue square on a black background". The caption never says *where* the
# shapes are — the layout comes from the initial noise alone, which is what makes layout preservation measurable.
# Set `P2P_TINY_CHECKPOINT` to load another file, `P2P_NOTEBOOK_STEPS` to change the number of DDIM steps.

# %%
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets; we show no progress bars

# The repository root: the first folder upwards holding p2p/ and setup.py, so this runs from the repo or notebooks/.
REPO = next((p for p in (Path.cwd(), *Path.cwd().parents) if (p / "setup.py").is_file() and (p / "p2p").is_dir()), None)
if REPO is None:
    raise FileNotFoundError(f"no Prompt-to-Prompt repository at or above {Path.cwd()}; start Jupyter in the "
                            "repository or in its notebooks/ folder")
sys.path.insert(0, str(REPO))  # import models/ and p2p/ without installing the package
CHECKPOINT = Path(os.environ.get("P2P_TINY_CHECKPOINT", REPO / "models" / "weights" / "tiny.safetensors"))
STEPS = int(os.environ.get("P2P_NOTEBOOK_STEPS", "50"))  # DDIM steps; the CI test runs fewer

# %%
import numpy as np
from IPython.display import display

from models.loader import load_checkpoint
from p2p import views
from p2p.edit import BlendSpec, EditSpec, edit
from p2p.pipeline import SamplerSettings
from p2p.shapes.metrics import score_edit
from p2p.shapes.reader import read_image
from p2p.tokens import decode_tokens, refine_alignment

model = load_checkpoint(CHECKPOINT)  # strict: every tensor of the file has its place, and nothing is missing
settings = SamplerSettings(steps=STEPS, guidance=model.config.guidance)  # the guidance the model was trained for
latent_side = model.config.image_size // model.config.latent_factor
print(f"{CHECKPOINT.name}: {model.config.image_size}×{model.config.image_size} px images, "
      f"{latent_side}×{latent_side} latents, {STEPS} DDIM steps, guidance {settings.guidance}")

# %% [markdown]
# ## Refine: add words (paper §3.2 "Adding a new phrase", Fig. 7)
#
# The target adds words, so tokens no longer line up one to one. `kind="refine"` aligns the two token
# sequences (a longest common subsequence) and injects the source's maps into every target token that has a
# partner — padding included; new tokens keep their own maps, so the new words can change the picture.
# Here the source names no background and the model draws it black; the targets ask for white and gray.

# %%
SOURCE = "a red circle"
TARGETS = ["a red circle on a white background", "a red circle on a gray background"]
SEED = 9

_, aligned = refine_alignment(SOURCE, TARGETS[0], context_length=model.context_length)
print("new tokens in the first target:", [token for token, a in zip(["<start>", *decode_tokens(TARGETS[0])], aligned) if a == 0])

# %% [markdown]
# Plain sampling moves the circle when the background changes (on white it moves down and shrinks; on gray it
# stays, IoU 0.93). Refine keeps it in place on both — IoU with the source 0.61 → 0.88 on white, 0.93 → 0.88 on
# gray: the aligned tokens' maps are injected, while the new background words, whose maps are free, still redraw
# its edge a little. Over seeds 0–19 refine keeps the circle at IoU 0.76–0.95 at every seed (mean 0.85 on white,
# 0.87 on gray), where same-seed sampling ranges from 0 to 0.99 (mean 0.55 and 0.80); at the seeds where plain
# sampling already keeps the circle, refine is a few hundredths lower. One detail matters on this model: refine gives each aligned target token the source's
# column and each new token the target's own, without renormalising, so a row sums to 1 only if the padding
# columns line up. Padding keeps its *position* (`p2p.tokens.padding_partner`, the reference's rule): this
# model puts about a third of its attention on the last of its 16 positions, and mapping the padding with the
# end token's shift instead (dropping the source's last padding columns) left rows summing to about 0.45 and
# broke every image.

# %%
refine = EditSpec(kind="refine", cross_replace_steps=0.8, self_replace_steps=0.4)

plain = edit(model, [SOURCE, *TARGETS], seed=SEED, settings=settings, progress=False)
refined = edit(model, [SOURCE, *TARGETS], seed=SEED, spec=refine, settings=settings, progress=False)
print("top: same seed, no injection; bottom: refine")
display(views.image_grid([*plain.images, *refined.images], [SOURCE, *TARGETS] * 2, columns=1 + len(TARGETS)))
for name, result in (("no injection", plain), ("refine", refined)):
    ious = [score_edit(result.images[0], image, source_caption=SOURCE, target_caption=target).iou
            for image, target in zip(result.images[1:], TARGETS)]
    print(f"{name:13s} circle IoU with the source: {', '.join(f'{iou:.2f}' for iou in ious)}")

# %% [markdown]
# ## Reweight: a fader on one word (paper §3.2 "Attention re-weighting", Fig. 9)
#
# Scale one word's attention column by `c` in the target (no renormalisation, as in the paper): above 1 the
# word gets more say over every pixel, below 1 less, negative values push it away. The source is generated
# alongside and all its maps are injected, so only the reweighted word's influence changes. One scale per
# target prompt: here copies of the same prompt, one per `c`.
#
# On this model the fader on `circle` acts on the circle's *size*, step by step: −5 shrinks it to less than half
# (64 px against the source's 149), −2 to 91, 0 to 135, and 2 and 5 grow it (160, 175 px); 10 grows it further and
# tints the background, 20 breaks the image. A fader on the color word does nothing here (docs/figures.md, Fig. 9):
# `red`'s column holds about 1% of the circle's attention (notebook 1).

# %%
PROMPT = "a red circle on a black background"
WORD = "circle"
SCALES = [-5.0, -2.0, 0.0, 1.0, 2.0, 5.0, 10.0, 20.0]

fader = EditSpec(kind="reweight", reweight={WORD: SCALES})
faded = edit(model, [PROMPT] * (1 + len(SCALES)), seed=3, spec=fader, settings=settings, progress=False)
areas = [sum(obj.area for obj in read_image(image).objects) for image in faded.images]  # object pixels, as read
display(views.image_grid(faded.images, [f"source: {areas[0]} px", *[f"{WORD} x {c:g}: {a} px" for c, a in zip(SCALES, areas[1:])]]))

# %% [markdown]
# ## LocalBlend: change only where the edited word is (paper §3.2 "Local editing", Fig. 12)
#
# Attention injection keeps the layout, but pixels away from the edit can still drift. `LocalBlend` turns the
# edited word's own cross-attention into a mask (summed over the steps so far, dilated by a 3×3 max-pool,
# divided by its maximum, thresholded at 0.3) and after every step copies the source's latent outside the
# mask: `x_tgt ← x_src + mask·(x_tgt − x_src)`. In the paper's SD results the mask outlines the object.
#
# On this model it does too: `circle`'s map is selective (notebook 1), and the mask covers the circle and
# its neighbourhood, a quarter of the latent. Here the swap alone already keeps the circle in place and the gray
# background as it was, so the blend has little left to protect: both change about 14% of the pixels, the circle's
# own area. LocalBlend can keep only what is outside the mask *as the source drew it*, so it protects the rest of
# an image (another object: `scripts/eval_edits.py` measures that, with `blend=local_tiny`), not an edit that
# moves. `threshold` and `dilation` in `BlendSpec` are the knobs to try.

# %%
SWAP = ["a red circle on a gray background", "a blue circle on a gray background"]
swap = EditSpec(kind="replace", cross_replace_steps=0.8, self_replace_steps=0.4)

unblended = edit(model, SWAP, seed=3, spec=swap, settings=settings, progress=False)
blended = edit(model, SWAP, seed=3, spec=swap, blend=BlendSpec(words=["circle"]), settings=settings, progress=False)
mask = blended.blend.last_mask[1:]  # (1, 1, 8, 8); row 0, the source, is never blended
display(views.grid([[views.captioned(unblended.images[0], "source"), views.captioned(unblended.images[1], "swap only"),
                     views.captioned(blended.images[1], "swap + LocalBlend"),
                     *views.mask_tiles(mask, [f"mask: {mask.mean():.0%} of the latent"])]]))
for name, result in (("swap only", unblended), ("swap + LocalBlend", blended)):
    score = score_edit(result.images[0], result.images[1], source_caption=SWAP[0], target_caption=SWAP[1])
    changed = np.abs(result.images[0].astype(int) - result.images[1].astype(int)).max(axis=-1) > 32
    print(f"{name:18s} drawn as its caption: {score.target_correct!s:5s}  pixels changed by > 32/255: {changed.mean():.1%}")

# %% [markdown]
# ## Object preservation: inject one word only (paper Fig. 5)
#
# `preserve=["circle"]` injects only that word's maps (every other token gets an empty window) and no
# self-attention, so that the circle keeps its place while the rest of the prompt — here the background — is
# generated freely. On this model it helps, though not fully: without injection the circle on white is drawn
# smaller and lower (IoU with the source 0.57) and shifts on gray (0.70); injecting only `circle` brings it closer
# (0.75, 0.83); injecting every token (`kind="replace"`, which here swaps the background word) keeps it best (0.94,
# 0.90), because the padding tokens, which carry most of the attention, are injected too. Over seeds 0–19 the
# same `circle`-only injection raises the circle's mean IoU from 0.41 to 0.62 (docs/figures.md, Fig. 5).

# %%
SOURCE = "a red circle on a black background"
CONTEXTS = ["a red circle on a white background", "a red circle on a gray background"]
preserve = EditSpec(kind="refine", preserve=["circle"], self_replace_steps=0.0)
everything = EditSpec(kind="replace", cross_replace_steps=0.8, self_replace_steps=0.4)

runs = {"no injection": None, "only 'circle' injected": preserve, "every token injected": everything}
results = {name: edit(model, [SOURCE, *CONTEXTS], seed=3, spec=spec, settings=settings, progress=False)
           for name, spec in runs.items()}
display(views.image_grid(np.concatenate([result.images for result in results.values()]),
                         [f"{name}: {prompt}" for name in results for prompt in [SOURCE, *CONTEXTS]],
                         columns=1 + len(CONTEXTS)))
for name, result in results.items():
    ious = [score_edit(result.images[0], image, source_caption=SOURCE, target_caption=context).iou
            for image, context in zip(result.images[1:], CONTEXTS)]
    print(f"{name:23s} circle IoU with the source: {', '.join(f'{iou:.2f}' for iou in ious)}")
