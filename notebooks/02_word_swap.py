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
# # 2 · Word swap: keep the picture, change one word
#
# Generate an image, change one word of its prompt, generate again from the *same* seed: the new image need
# not keep the old one's layout, because a different prompt steers the same noise elsewhere. Prompt-to-Prompt
# (Hertz et al. 2022, §3.2 "Word swap", Figs. 2 and 6) fixes this by generating source and target together
# and, during the first part of the run, giving the target the source's cross-attention maps (notebook 1
# showed that these maps hold the layout). The target's own tokens still supply the *values*, so the swapped
# word changes what is drawn, not where.

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
from IPython.display import display

from models.loader import load_checkpoint
from p2p import views
from p2p.edit import EditSpec, edit
from p2p.pipeline import SamplerSettings
from p2p.shapes.metrics import score_edit

model = load_checkpoint(CHECKPOINT)  # strict: every tensor of the file has its place, and nothing is missing
settings = SamplerSettings(steps=STEPS, guidance=model.config.guidance)  # the guidance the model was trained for
latent_side = model.config.image_size // model.config.latent_factor
print(f"{CHECKPOINT.name}: {model.config.image_size}×{model.config.image_size} px images, "
      f"{latent_side}×{latent_side} latents, {STEPS} DDIM steps, guidance {settings.guidance}")

# %% [markdown]
# ## Same seed, no injection
#
# Source first, then the targets; all start from one shared initial latent `x_T` (`p2p.pipeline.initial_latent`).
# Without an edit spec nothing touches the attention. `score_edit` reads every image with the shapes world's
# reader (`p2p/shapes/reader.py`): whether the target is drawn as its caption says, and the IoU of the object masks of
# source and target — 1 means the object covers exactly the same pixels. Watch the blue circle: with the same
# seed it lands in the opposite corner of the image, larger; the square and the yellow circle shift a little,
# the triangle shrinks.

# %%
SOURCE = "a red circle on a black background"
TARGETS = ["a blue circle on a black background", "a yellow circle on a black background",
           "a red square on a black background", "a red triangle on a black background"]
PROMPTS = [SOURCE, *TARGETS]
SEED = 24

plain = edit(model, PROMPTS, seed=SEED, settings=settings, progress=False)
display(views.image_grid(plain.images, PROMPTS))
for target, image in zip(TARGETS, plain.images[1:]):
    score = score_edit(plain.images[0], image, source_caption=SOURCE, target_caption=target)
    print(f"{target:40s} drawn as its caption: {score.target_correct!s:5s}  layout IoU with the source: {score.iou:.2f}")

# %% [markdown]
# ## With injection: one line of config
#
# `kind="replace"` hands each target token the map of the source token in the same place (the swapped word gets
# the swapped-out word's map; the padding tokens, which carry most of the attention in this model, get theirs)
# for the first 80% of the steps (`cross_replace_steps`); `self_replace_steps=0.4` would also copy the source's
# self-attention maps in layers at most latent/4 on a side during the first 40% — the paper's defaults. (This
# model's only layers that coarse are hybrid, and P2P edits only their text columns, so here the cross-attention
# injection does all the work.) The edit is an
# `AttentionEdit` controller (`p2p/controllers.py`), the same one `scripts/edit.py edit=replace` builds.
# Every object now stays where the source put it; a shape swap cannot reach IoU 1, since a triangle covers
# other pixels than a circle.

# %%
swap = EditSpec(kind="replace", cross_replace_steps=0.8, self_replace_steps=0.4)

injected = edit(model, PROMPTS, seed=SEED, spec=swap, settings=settings, progress=False)
display(views.image_grid(injected.images, PROMPTS))
for target, image in zip(TARGETS, injected.images[1:]):
    score = score_edit(injected.images[0], image, source_caption=SOURCE, target_caption=target)
    print(f"{target:40s} drawn as its caption: {score.target_correct!s:5s}  layout IoU with the source: {score.iou:.2f}")

# %% [markdown]
# ## The injection fraction, as a slider (paper Fig. 6)
#
# One row per target, one column per fraction of the steps during which the source's cross-attention maps are
# injected (self-attention is left alone here, as in the paper's figure). At 0% it is plain same-seed
# sampling. 20% is not enough for the blue circle (it comes most of the way back), 40% brings it to the source's
# place — the layout is decided in the first steps (notebook 1) — and more injection brings the outline closer
# still (the IoU under each tile); the triangle grows toward the circle's size with every step of injection. In the paper,
# injecting through the whole run can stop the target from following its prompt; on this model the swaps
# survive even 100%. "not read" means the reader (`p2p/shapes/reader.py`) did not read the tile as its caption; it is
# strict about colors and corners at 32 px, so look at the tile before trusting the label.

# %%
FRACTIONS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
sweep = {f: edit(model, PROMPTS, seed=SEED, settings=settings, progress=False,
                 spec=EditSpec(kind="replace", cross_replace_steps=f, self_replace_steps=0.0))
         for f in FRACTIONS}
for t, target in enumerate(TARGETS, start=1):
    scores = {f: score_edit(result.images[0], result.images[t], source_caption=SOURCE, target_caption=target)
              for f, result in sweep.items()}
    print(target)
    display(views.image_grid([result.images[t] for result in sweep.values()],
                             [f"{f:.0%}: IoU {s.iou:.2f}, {'ok' if s.target_correct else 'not read'}"
                              for f, s in scores.items()]))

# %% [markdown]
# ## When is the layout decided?
#
# Injection can only hold a layout that is still being decided while it runs. The sampler's `on_prediction` hook
# shows, at every step, where the image is heading: the clean image x̂0 predicted from the guided noise estimate.
# At first it is a blur (every layout is still possible), then the object appears and stops moving.
# `p2p.shapes.metrics.layout_commit_step` finds the step from which the reader's object mask stays within IoU 0.8 of the
# final one. On this model that is step 15 of 50 in the median (quartiles 7–20, 90th percentile 23;
# `scripts/eval_edits.py` over 200 seeds, details in `models/weights/README.md`): about one layout in four is
# decided only after the paper's 40% self-attention window, but all but a few within the 80% cross-attention
# window. Watch the object's outline below change long after its place is set.

# %%
import torch

from p2p.pipeline import decode, generate
from p2p.shapes.metrics import layout_commit_step

predicted = []
final = generate(model, [SOURCE], seed=SEED, settings=settings, progress=False,
                 on_prediction=lambda step, x0: predicted.append(x0))
frames = [*decode(model, torch.cat(predicted)), final[0]]
shown = sorted({*range(0, len(predicted), max(1, len(predicted) // 8)), len(frames) - 1})
display(views.image_grid([frames[i] for i in shown],
                         [f"x̂0, step {i}" if i < len(predicted) else "final image" for i in shown]))
print(f"layout decided at step {layout_commit_step(frames)} of {len(predicted)}")
