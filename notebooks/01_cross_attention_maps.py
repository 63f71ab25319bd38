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
# # 1 · Cross-attention maps: where the prompt goes in the picture
#
# Stable Diffusion reads the prompt in its **cross-attention** layers: every pixel of a UNet feature map
# (a *query*) takes a softmax over the prompt's tokens (the *keys*: 77 in SD, 16 in the built-in model), `M = softmax(QKᵀ/√d)`. Row *i* of `M`
# says how much each token contributes to pixel *i*; column *j*, reshaped to the feature map, is token *j*'s
# **attention map**.
#
# Prompt-to-Prompt (Hertz et al. 2022, §3.1 and Fig. 4) rests on one observation, which this notebook shows on
# the built-in model: the maps already hold the image's layout, and that layout settles early in the
# denoising run. It also shows where this small model differs from SD, which matters for notebook 3.

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
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from IPython.display import display

from models.loader import load_checkpoint
from p2p import views
from p2p.edit import StoreSpec, edit
from p2p.pipeline import SamplerSettings
from p2p.shapes.reader import read_image
from p2p.tokens import decode_tokens, word_token_positions

model = load_checkpoint(CHECKPOINT)  # strict: every tensor of the file has its place, and nothing is missing
settings = SamplerSettings(steps=STEPS, guidance=model.config.guidance)  # the guidance the model was trained for
latent_side = model.config.image_size // model.config.latent_factor
print(f"{CHECKPOINT.name}: {model.config.image_size}×{model.config.image_size} px images, "
      f"{latent_side}×{latent_side} latents, {STEPS} DDIM steps, guidance {settings.guidance}")

# %% [markdown]
# ## Generate an image and record its attention
#
# `edit` is the entry point the scripts use (`scripts/generate.py`, `scripts/edit.py`, `scripts/figure.py`);
# without an edit spec it is plain text-to-image sampling. `StoreSpec` attaches an `AttentionStore`
# (`p2p/controllers.py`) that copies the maps of the conditional branch, averaged over heads, at every step;
# `per_step=True` keeps each step separately as well as the running sum.
#
# `max_fraction=1.0` records layers up to the latent's own side. The default (½, the reference's 32×32 layers at
# 512 px) would skip the tiny model's only pure cross-attention layers, which run at the full 8×8 latent.

# %%
PROMPT = "a red circle on a black background"
SEED = 3
result = edit(model, [PROMPT], seed=SEED, settings=settings, store=StoreSpec(per_step=True, max_fraction=1.0),
              progress=False)
store = result.store
display(views.image_grid(result.images, [PROMPT]))

# %% [markdown]
# ## Every token's map, averaged over layers and steps (paper Fig. 4)
#
# One tile per token, start and end tokens included, averaged over every recorded layer (coarse layers
# upsampled) and every step. Each tile is scaled to its own maximum, so compare *where* a map is bright,
# not how bright. `circle`, `on` and the second `a` light up the circle (`a` as a ring around it); `red` is
# faint in this average, because the coarse layers blur it (the 8×8 layers below show it sharp); `black`,
# `background` and `<end>` are bright everywhere except on the circle — they are the background's tokens; the
# start token and the first `a` are spread over everything.

# %%
display(views.grid([views.cross_attention_tiles(store, PROMPT, 0)]))

# %% [markdown]
# ## Per layer resolution
#
# The tiny UNet reads text at three resolutions: plain cross-attention (`attn2`) at the latent's 8×8, and
# hybrid attention (`attn1`, Imagen-style: the text keys are concatenated to the self-attention keys; the
# store keeps their text columns) at 4×4 and 2×2. The sites are named by their `state_dict` prefix, the same
# names the weights have. In the 8×8 layers `red` and `circle` are a sharp spot on the circle, `on` its
# outline; the 4×4 layers show a blob (`circle` a bright square, the background words a dark one), the 2×2
# layers little more than a gradient across the image — so the step-by-step view below uses the 8×8 layers.

# %%
grids = sorted({site.query_hw for site in store.sites.values()}, reverse=True)
for grid_hw in grids:
    layers = [name for name, site in store.sites.items() if site.query_hw == grid_hw]
    print(f"{grid_hw[0]}×{grid_hw[1]}: {len(layers)} layers: {', '.join(layers)}")
    display(views.grid([views.cross_attention_tiles(store, PROMPT, 0, grids=[grid_hw])]))

# %% [markdown]
# ## Step by step: the layout comes first
#
# Now the maps of single steps instead of the average. Each row follows one word through six evenly spaced
# steps, from the first, noisiest one to the last.

# %%
WORDS = ["circle", "background"]
finest = [grids[0]]  # the 8×8 cross-attention layers
shown = sorted({round(i * (STEPS - 1) / 5) for i in range(6)})  # six evenly spaced steps, first and last included
per_step = {step: views.token_maps(store, 0, grids=finest, step=step) for step in range(STEPS)}  # step → (16 tokens, 8, 8)
rows = [[views.captioned(views.heat(per_step[step][word_token_positions(PROMPT, word)].sum(dim=0)),
                         f"{word}, step {step + 1}") for step in shown] for word in WORDS]
display(views.grid(rows))

# %% [markdown]
# How early? Below, for each word, the correlation between its map at each step and its map at the last
# step (1 = the same picture). The circle's map is a bright spot at the circle's final place from the first step
# on and hardly changes (correlation ≥ 0.9 from step 9 of 50 here). The background's map is bright over the whole
# image at first; a dark hole at the circle's place opens from about step 11 and sharpens to the end (≥ 0.9 only
# from step 43).
# What is decided early is *where the object goes*; the remaining steps draw its size, colors and edges into a
# layout that no longer moves. This is why Prompt-to-Prompt injects the source's maps during the *first* part of
# the run (notebook 2).

# %%
fig, ax = plt.subplots(figsize=(6, 3))
for word in WORDS:
    positions = word_token_positions(PROMPT, word)
    final = per_step[STEPS - 1][positions].sum(dim=0).flatten()
    correlation = [float(torch.corrcoef(torch.stack([per_step[step][positions].sum(dim=0).flatten(), final]))[0, 1])
                   for step in range(STEPS)]
    ax.plot(range(1, STEPS + 1), correlation, label=word)
    print(f"{word}: correlation with the last step ≥ 0.9 from step "
          f"{next((step + 1 for step, c in enumerate(correlation) if c >= 0.9), None)} of {STEPS}")
ax.set(xlabel="DDIM step", ylabel="correlation with the last step", ylim=(-0.1, 1.05))
ax.legend()
plt.show()

# %% [markdown]
# ## Where does the attention go?
#
# The tiles above show the prompt's tokens only. Each pixel's attention also goes to the *padding* tokens that
# fill the slots after `<end>` (16 in this model's context, 77 in SD's). This model pads with token 0, as SD 2
# does, and its text encoder is causal (each token sees the ones before it), so every padding token is a summary
# of the whole prompt. Below, the share of the 8×8 layers' attention that each token gets, averaged over pixels
# and steps. With this prompt's 7 padding tokens the padding gets most of it, about three quarters — but not
# evenly: the model was trained to draw each object's color and shape words from the object's own pixels
# (the token-grounding loss of its model card), so on the circle the words get about two thirds of the attention,
# elsewhere about a fifth, and the background pixels read mostly the padding. One word's column holds little even
# on the circle, and not the word one would expect: `red` gets about 1%, `circle` about a tenth, `on` and the
# second `a` a fifth each — the encoder is causal, so the later tokens carry the color too. Notebook 3 and
# docs/figures.md (Fig. 9) come back to this: it is why a fader on `red` does nothing on this model, while
# one on `circle` works.

# %%
mass = views.token_maps(store, 0, grids=finest).mean(dim=(1, 2))  # (16,) for this model: mean over pixels; each pixel's row sums to 1
tokens = ["<start>", *decode_tokens(PROMPT), "<end>"]
shares = [*mass[:len(tokens)].tolist(), mass[len(tokens):].sum().item()]
fig, ax = plt.subplots(figsize=(7, 2.5))
ax.bar(range(len(shares)), shares)
ax.set_xticks(range(len(shares)), [*tokens, f"padding\n({model.context_length - len(tokens)} tokens)"], rotation=45, ha="right")
ax.set(ylabel="share of attention")
plt.show()
print(f"words {mass[1:len(tokens) - 1].sum():.0%}, start + end {mass[0] + mass[len(tokens) - 1]:.0%}, "
      f"padding {mass[len(tokens):].sum():.0%}")

# The same split on the circle's latent cells (the reader's mask, pooled to the 8×8 grid) and elsewhere
maps = views.token_maps(store, 0, grids=finest)
words, padding = maps[1:len(tokens) - 1].sum(dim=0), maps[len(tokens):].sum(dim=0)
objects = read_image(result.images[0]).objects
if objects:
    inside = F.avg_pool2d(torch.from_numpy(objects[0].mask).float()[None, None], model.config.latent_factor)[0, 0] >= 0.5
    print(f"on the circle ({int(inside.sum())} of {inside.numel()} cells): words {words[inside].mean():.0%}, "
          f"padding {padding[inside].mean():.0%}; elsewhere: words {words[~inside].mean():.0%}, "
          f"padding {padding[~inside].mean():.0%}")
else:
    print("the reader finds no object in this image (with very few steps the model may draw none)")

# %% [markdown]
# ## Two objects
#
# Ask for two objects and this model gets both right only about two times in three (the model card measures
# it); other seeds draw a third shape or mix the colors (seed 3, the one above, draws a single blue blob). When it
# draws them right, as at seed 1, its maps separate the objects, as in SD (paper Fig. 4): `red` and `circle` light
# the circle, `blue` and `square` the square (at all 15 of the seeds 0–19 that draw both right:
# docs/figures.md, Fig. 4).

# %%
TWO = "a red circle and a blue square on a black background"
two = edit(model, [TWO], seed=1, settings=settings, store=StoreSpec(max_fraction=1.0), progress=False)
display(views.grid([[views.captioned(two.images[0], TWO),
                     *views.cross_attention_tiles(two.store, TWO, 0, grids=finest)]]))
