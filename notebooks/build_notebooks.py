"""Write the four teaching notebooks (issue 6) from the cell texts below, without outputs.

    python notebooks/build_notebooks.py

Edit the cells here, not in the .ipynb files, and rerun: the notebooks are generated so that the committed
files stay small (no outputs) and the four share one setup cell. Every cell only calls `models/` and `p2p/`;
tests/test_notebooks.py executes them all top to bottom.
"""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def setup_cell(default_steps: int) -> str:
    return f'''import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets; we show no progress bars

# The repository root: the first folder upwards holding p2p/ and setup.py, so this runs from the repo or notebooks/.
REPO = next((p for p in (Path.cwd(), *Path.cwd().parents) if (p / "setup.py").is_file() and (p / "p2p").is_dir()), None)
if REPO is None:
    raise FileNotFoundError(f"no Prompt-to-Prompt repository at or above {{Path.cwd()}}; start Jupyter in the "
                            "repository or in its notebooks/ folder")
sys.path.insert(0, str(REPO))  # import models/ and p2p/ without installing the package
CHECKPOINT = Path(os.environ.get("P2P_TINY_CHECKPOINT", REPO / "models" / "weights" / "tiny.safetensors"))
STEPS = int(os.environ.get("P2P_NOTEBOOK_STEPS", "{default_steps}"))  # DDIM steps; the CI test runs fewer'''


def load_model(guidance: str = "model.config.guidance", why: str = "the guidance the model was trained for") -> str:
    return f'''model = load_checkpoint(CHECKPOINT)  # strict: every tensor of the file has its place, and nothing is missing
settings = SamplerSettings(steps=STEPS, guidance={guidance})  # {why}
latent_side = model.config.image_size // model.config.latent_factor
print(f"{{CHECKPOINT.name}}: {{model.config.image_size}}×{{model.config.image_size}} px images, "
      f"{{latent_side}}×{{latent_side}} latents, {{STEPS}} DDIM steps, guidance {{settings.guidance}}")'''


LOADING_MD = '''## The built-in model

`models/weights/tiny.safetensors` is a ~13 M-parameter Stable Diffusion (same UNet, VAE, text encoder and DDIM
sampler as SD, only smaller) trained on the *shapes world*: 32×32 images of one or two colored shapes with
captions like "a red circle and a blue square on a black background". The caption never says *where* the
shapes are — the layout comes from the initial noise alone, which is what makes layout preservation measurable.
Set `P2P_TINY_CHECKPOINT` to load another file, `P2P_NOTEBOOK_STEPS` to change the number of DDIM steps.'''


# ---------------------------------------------------------------------------------------------------------------
# 01: cross-attention maps
# ---------------------------------------------------------------------------------------------------------------
NB01 = [
    ("md", '''# 1 · Cross-attention maps: where the prompt goes in the picture

Stable Diffusion reads the prompt in its **cross-attention** layers: every pixel of a UNet feature map
(a *query*) takes a softmax over the prompt's tokens (the *keys*: 77 in SD, 16 in the built-in model), `M = softmax(QKᵀ/√d)`. Row *i* of `M`
says how much each token contributes to pixel *i*; column *j*, reshaped to the feature map, is token *j*'s
**attention map**.

Prompt-to-Prompt (Hertz et al. 2022, §3.1 and Fig. 4) rests on one observation, which this notebook shows on
the built-in model: the maps already hold the image's layout, and that layout settles early in the
denoising run. It also shows where this small model differs from SD, which matters for notebook 3.'''),
    ("md", LOADING_MD),
    ("code", setup_cell(50)),
    ("code", '''import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from IPython.display import display

from models.loader import load_checkpoint
from p2p import views
from p2p.edit import StoreSpec, edit
from p2p.pipeline import SamplerSettings
from p2p.shapes.reader import read_image
from p2p.tokens import decode_tokens, word_token_positions

''' + load_model()),
    ("md", '''## Generate an image and record its attention

`edit` is the entry point the scripts use (`scripts/generate.py`, `scripts/edit.py`, `scripts/figure.py`);
without an edit spec it is plain text-to-image sampling. `StoreSpec` attaches an `AttentionStore`
(`p2p/controllers.py`) that copies the maps of the conditional branch, averaged over heads, at every step;
`per_step=True` keeps each step separately as well as the running sum.

`max_fraction=1.0` records layers up to the latent's own side. The default (½, the reference's 32×32 layers at
512 px) would skip the tiny model's only pure cross-attention layers, which run at the full 8×8 latent.'''),
    ("code", '''PROMPT = "a red circle on a black background"
SEED = 3
result = edit(model, [PROMPT], seed=SEED, settings=settings, store=StoreSpec(per_step=True, max_fraction=1.0),
              progress=False)
store = result.store
display(views.image_grid(result.images, [PROMPT]))'''),
    ("md", '''## Every token's map, averaged over layers and steps (paper Fig. 4)

One tile per token, start and end tokens included, averaged over every recorded layer (coarse layers
upsampled) and every step. Each tile is scaled to its own maximum, so compare *where* a map is bright,
not how bright. `circle`, `on` and the second `a` light up the circle (`a` as a ring around it); `red` is
faint in this average, because the coarse layers blur it (the 8×8 layers below show it sharp); `black`,
`background` and `<end>` are bright everywhere except on the circle — they are the background's tokens; the
start token and the first `a` are spread over everything.'''),
    ("code", '''display(views.grid([views.cross_attention_tiles(store, PROMPT, 0)]))'''),
    ("md", '''## Per layer resolution

The tiny UNet reads text at three resolutions: plain cross-attention (`attn2`) at the latent's 8×8, and
hybrid attention (`attn1`, Imagen-style: the text keys are concatenated to the self-attention keys; the
store keeps their text columns) at 4×4 and 2×2. The sites are named by their `state_dict` prefix, the same
names the weights have. In the 8×8 layers `red` and `circle` are a sharp spot on the circle, `on` its
outline; the 4×4 layers show a blob (`circle` a bright square, the background words a dark one), the 2×2
layers little more than a gradient across the image — so the step-by-step view below uses the 8×8 layers.'''),
    ("code", '''grids = sorted({site.query_hw for site in store.sites.values()}, reverse=True)
for grid_hw in grids:
    layers = [name for name, site in store.sites.items() if site.query_hw == grid_hw]
    print(f"{grid_hw[0]}×{grid_hw[1]}: {len(layers)} layers: {', '.join(layers)}")
    display(views.grid([views.cross_attention_tiles(store, PROMPT, 0, grids=[grid_hw])]))'''),
    ("md", '''## Step by step: the layout comes first

Now the maps of single steps instead of the average. Each row follows one word through six evenly spaced
steps, from the first, noisiest one to the last.'''),
    ("code", '''WORDS = ["circle", "background"]
finest = [grids[0]]  # the 8×8 cross-attention layers
shown = sorted({round(i * (STEPS - 1) / 5) for i in range(6)})  # six evenly spaced steps, first and last included
per_step = {step: views.token_maps(store, 0, grids=finest, step=step) for step in range(STEPS)}  # step → (16 tokens, 8, 8)
rows = [[views.captioned(views.heat(per_step[step][word_token_positions(PROMPT, word)].sum(dim=0)),
                         f"{word}, step {step + 1}") for step in shown] for word in WORDS]
display(views.grid(rows))'''),
    ("md", '''How early? Below, for each word, the correlation between its map at each step and its map at the last
step (1 = the same picture). The circle's map is a bright spot at the circle's final place from the first step
on and hardly changes (correlation ≥ 0.9 from step 9 of 50 here). The background's map is bright over the whole
image at first; a dark hole at the circle's place opens from about step 11 and sharpens to the end (≥ 0.9 only
from step 43).
What is decided early is *where the object goes*; the remaining steps draw its size, colors and edges into a
layout that no longer moves. This is why Prompt-to-Prompt injects the source's maps during the *first* part of
the run (notebook 2).'''),
    ("code", '''fig, ax = plt.subplots(figsize=(6, 3))
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
plt.show()'''),
    ("md", '''## Where does the attention go?

The tiles above show the prompt's tokens only. Each pixel's attention also goes to the *padding* tokens that
fill the slots after `<end>` (16 in this model's context, 77 in SD's). This model pads with token 0, as SD 2
does, and its text encoder is causal (each token sees the ones before it), so every padding token is a summary
of the whole prompt. Below, the share of the 8×8 layers' attention that each token gets, averaged over pixels
and steps. With this prompt's 7 padding tokens the padding gets most of it, about three quarters — but not
evenly: the model was trained to draw each object's color and shape words from the object's own pixels
(the token-grounding loss of its model card), so on the circle the words get about two thirds of the attention,
elsewhere about a fifth, and the background pixels read mostly the padding. One word's column holds little even
on the circle, and not the word one would expect: `red` gets about 1%, `circle` about a tenth, `on` and the
second `a` a fifth each — the encoder is causal, so the later tokens carry the color too. Notebook 3 and
docs/FIGURES.md (Fig. 9) come back to this: it is why a fader on `red` does nothing on this model, while
one on `circle` works.'''),
    ("code", '''mass = views.token_maps(store, 0, grids=finest).mean(dim=(1, 2))  # (16,) for this model: mean over pixels; each pixel's row sums to 1
tokens = ["<start>", *decode_tokens(PROMPT), "<end>"]
shares = [*mass[:len(tokens)].tolist(), mass[len(tokens):].sum().item()]
fig, ax = plt.subplots(figsize=(7, 2.5))
ax.bar(range(len(shares)), shares)
ax.set_xticks(range(len(shares)), [*tokens, f"padding\\n({model.context_length - len(tokens)} tokens)"], rotation=45, ha="right")
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
    print("the reader finds no object in this image (with very few steps the model may draw none)")'''),
    ("md", '''## Two objects

Ask for two objects and this model gets both right only about two times in three (the model card measures
it); other seeds draw a third shape or mix the colors (seed 3, the one above, draws a single blue blob). When it
draws them right, as at seed 1, its maps separate the objects, as in SD (paper Fig. 4): `red` and `circle` light
the circle, `blue` and `square` the square (at all 15 of the seeds 0–19 that draw both right:
docs/FIGURES.md, Fig. 4).'''),
    ("code", '''TWO = "a red circle and a blue square on a black background"
two = edit(model, [TWO], seed=1, settings=settings, store=StoreSpec(max_fraction=1.0), progress=False)
display(views.grid([[views.captioned(two.images[0], TWO),
                     *views.cross_attention_tiles(two.store, TWO, 0, grids=finest)]]))'''),
]

# ---------------------------------------------------------------------------------------------------------------
# 02: word swap
# ---------------------------------------------------------------------------------------------------------------
NB02 = [
    ("md", '''# 2 · Word swap: keep the picture, change one word

Generate an image, change one word of its prompt, generate again from the *same* seed: the new image need
not keep the old one's layout, because a different prompt steers the same noise elsewhere. Prompt-to-Prompt
(Hertz et al. 2022, §3.2 "Word swap", Figs. 2 and 6) fixes this by generating source and target together
and, during the first part of the run, giving the target the source's cross-attention maps (notebook 1
showed that these maps hold the layout). The target's own tokens still supply the *values*, so the swapped
word changes what is drawn, not where.'''),
    ("md", LOADING_MD),
    ("code", setup_cell(50)),
    ("code", '''from IPython.display import display

from models.loader import load_checkpoint
from p2p import views
from p2p.edit import EditSpec, edit
from p2p.shapes.metrics import score_edit
from p2p.pipeline import SamplerSettings

''' + load_model()),
    ("md", '''## Same seed, no injection

Source first, then the targets; all start from one shared initial latent `x_T` (`p2p.pipeline.initial_latent`).
Without an edit spec nothing touches the attention. `score_edit` reads every image with the shapes world's
reader (`p2p/shapes/reader.py`): whether the target is drawn as its caption says, and the IoU of the object masks of
source and target — 1 means the object covers exactly the same pixels. Watch the blue circle: with the same
seed it lands in the opposite corner of the image, larger; the square and the yellow circle shift a little,
the triangle shrinks.'''),
    ("code", '''SOURCE = "a red circle on a black background"
TARGETS = ["a blue circle on a black background", "a yellow circle on a black background",
           "a red square on a black background", "a red triangle on a black background"]
PROMPTS = [SOURCE, *TARGETS]
SEED = 24

plain = edit(model, PROMPTS, seed=SEED, settings=settings, progress=False)
display(views.image_grid(plain.images, PROMPTS))
for target, image in zip(TARGETS, plain.images[1:]):
    score = score_edit(plain.images[0], image, source_caption=SOURCE, target_caption=target)
    print(f"{target:40s} drawn as its caption: {score.target_correct!s:5s}  layout IoU with the source: {score.iou:.2f}")'''),
    ("md", '''## With injection: one line of config

`kind="replace"` hands each target token the map of the source token in the same place (the swapped word gets
the swapped-out word's map; the padding tokens, which carry most of the attention in this model, get theirs)
for the first 80% of the steps (`cross_replace_steps`); `self_replace_steps=0.4` would also copy the source's
self-attention maps in layers at most latent/4 on a side during the first 40% — the paper's defaults. (This
model's only layers that coarse are hybrid, and P2P edits only their text columns, so here the cross-attention
injection does all the work.) The edit is an
`AttentionEdit` controller (`p2p/controllers.py`), the same one `scripts/edit.py edit=replace` builds.
Every object now stays where the source put it; a shape swap cannot reach IoU 1, since a triangle covers
other pixels than a circle.'''),
    ("code", '''swap = EditSpec(kind="replace", cross_replace_steps=0.8, self_replace_steps=0.4)

injected = edit(model, PROMPTS, seed=SEED, spec=swap, settings=settings, progress=False)
display(views.image_grid(injected.images, PROMPTS))
for target, image in zip(TARGETS, injected.images[1:]):
    score = score_edit(injected.images[0], image, source_caption=SOURCE, target_caption=target)
    print(f"{target:40s} drawn as its caption: {score.target_correct!s:5s}  layout IoU with the source: {score.iou:.2f}")'''),
    ("md", '''## The injection fraction, as a slider (paper Fig. 6)

One row per target, one column per fraction of the steps during which the source's cross-attention maps are
injected (self-attention is left alone here, as in the paper's figure). At 0% it is plain same-seed
sampling. 20% is not enough for the blue circle (it comes most of the way back), 40% brings it to the source's
place — the layout is decided in the first steps (notebook 1) — and more injection brings the outline closer
still (the IoU under each tile); the triangle grows toward the circle's size with every step of injection. In the paper,
injecting through the whole run can stop the target from following its prompt; on this model the swaps
survive even 100%. "not read" means the reader (`p2p/shapes/reader.py`) did not read the tile as its caption; it is
strict about colors and corners at 32 px, so look at the tile before trusting the label.'''),
    ("code", '''FRACTIONS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
sweep = {f: edit(model, PROMPTS, seed=SEED, settings=settings, progress=False,
                 spec=EditSpec(kind="replace", cross_replace_steps=f, self_replace_steps=0.0))
         for f in FRACTIONS}
for t, target in enumerate(TARGETS, start=1):
    scores = {f: score_edit(result.images[0], result.images[t], source_caption=SOURCE, target_caption=target)
              for f, result in sweep.items()}
    print(target)
    display(views.image_grid([result.images[t] for result in sweep.values()],
                             [f"{f:.0%}: IoU {s.iou:.2f}, {'ok' if s.target_correct else 'not read'}"
                              for f, s in scores.items()]))'''),
    ("md", '''## When is the layout decided?

Injection can only hold a layout that is still being decided while it runs. The sampler's `on_prediction` hook
shows, at every step, where the image is heading: the clean image x̂0 predicted from the guided noise estimate.
At first it is a blur (every layout is still possible), then the object appears and stops moving.
`p2p.shapes.metrics.layout_commit_step` finds the step from which the reader's object mask stays within IoU 0.8 of the
final one. On this model that is step 15 of 50 in the median (quartiles 7–20, 90th percentile 23;
`scripts/eval_edits.py` over 200 seeds, details in `models/weights/README.md`): about one layout in four is
decided only after the paper's 40% self-attention window, but all but a few within the 80% cross-attention
window. Watch the object's outline below change long after its place is set.'''),
    ("code", '''import torch

from p2p.shapes.metrics import layout_commit_step
from p2p.pipeline import decode, generate

predicted = []
final = generate(model, [SOURCE], seed=SEED, settings=settings, progress=False,
                 on_prediction=lambda step, x0: predicted.append(x0))
frames = [*decode(model, torch.cat(predicted)), final[0]]
shown = sorted({*range(0, len(predicted), max(1, len(predicted) // 8)), len(frames) - 1})
display(views.image_grid([frames[i] for i in shown],
                         [f"x̂0, step {i}" if i < len(predicted) else "final image" for i in shown]))
print(f"layout decided at step {layout_commit_step(frames)} of {len(predicted)}")'''),
]

# ---------------------------------------------------------------------------------------------------------------
# 03: refine, reweight, LocalBlend, object preservation
# ---------------------------------------------------------------------------------------------------------------
NB03 = [
    ("md", '''# 3 · Refine, reweight, LocalBlend, object preservation

Word swap (notebook 2) is one of several edits the paper builds from the same idea — control the target's
attention maps with the source's. Each one below is **one line of config** (an `EditSpec` or a `BlendSpec`,
the schemas of the scripts' `edit=` and `blend=` config groups), run through the same `edit` call and the
same controllers as `scripts/edit.py`, and compared with plain same-seed sampling.

A warning before the pictures: notebook 1 showed that in this tiny model most of the cross-attention goes
to the padding tokens, which summarise the whole prompt (about a third of it even on the object), and each word's
own column holds from 1% (`red`) to a fifth. Edits that act on one word's column are therefore weaker here than in the paper's SD
results, and depend on which word; the sections below say what they do on this model and measure it.'''),
    ("md", LOADING_MD),
    ("code", setup_cell(50)),
    ("code", '''import numpy as np
from IPython.display import display

from models.loader import load_checkpoint
from p2p import views
from p2p.edit import BlendSpec, EditSpec, edit
from p2p.shapes.metrics import score_edit
from p2p.pipeline import SamplerSettings
from p2p.shapes.reader import read_image
from p2p.tokens import decode_tokens, refine_alignment

''' + load_model()),
    ("md", '''## Refine: add words (paper §3.2 "Adding a new phrase", Fig. 7)

The target adds words, so tokens no longer line up one to one. `kind="refine"` aligns the two token
sequences (a longest common subsequence) and injects the source's maps into every target token that has a
partner — padding included; new tokens keep their own maps, so the new words can change the picture.
Here the source names no background and the model draws it black; the targets ask for white and gray.'''),
    ("code", '''SOURCE = "a red circle"
TARGETS = ["a red circle on a white background", "a red circle on a gray background"]
SEED = 9

_, aligned = refine_alignment(SOURCE, TARGETS[0], context_length=model.context_length)
print("new tokens in the first target:", [token for token, a in zip(["<start>", *decode_tokens(TARGETS[0])], aligned) if a == 0])'''),
    ("md", '''Plain sampling moves the circle when the background changes (on white it moves down and shrinks; on gray it
stays, IoU 0.93). Refine keeps it in place on both — IoU with the source 0.61 → 0.88 on white, 0.93 → 0.88 on
gray: the aligned tokens' maps are injected, while the new background words, whose maps are free, still redraw
its edge a little. Over seeds 0–19 refine keeps the circle at IoU 0.76–0.95 at every seed (mean 0.85 on white,
0.87 on gray), where same-seed sampling ranges from 0 to 0.99 (mean 0.55 and 0.80); at the seeds where plain
sampling already keeps the circle, refine is a few hundredths lower. One detail matters on this model: refine gives each aligned target token the source's
column and each new token the target's own, without renormalising, so a row sums to 1 only if the padding
columns line up. Padding keeps its *position* (`p2p.tokens.padding_partner`, the reference's rule): this
model puts about a third of its attention on the last of its 16 positions, and mapping the padding with the
end token's shift instead (dropping the source's last padding columns) left rows summing to about 0.45 and
broke every image.'''),
    ("code", '''refine = EditSpec(kind="refine", cross_replace_steps=0.8, self_replace_steps=0.4)

plain = edit(model, [SOURCE, *TARGETS], seed=SEED, settings=settings, progress=False)
refined = edit(model, [SOURCE, *TARGETS], seed=SEED, spec=refine, settings=settings, progress=False)
print("top: same seed, no injection; bottom: refine")
display(views.image_grid([*plain.images, *refined.images], [SOURCE, *TARGETS] * 2, columns=1 + len(TARGETS)))
for name, result in (("no injection", plain), ("refine", refined)):
    ious = [score_edit(result.images[0], image, source_caption=SOURCE, target_caption=target).iou
            for image, target in zip(result.images[1:], TARGETS)]
    print(f"{name:13s} circle IoU with the source: {', '.join(f'{iou:.2f}' for iou in ious)}")'''),
    ("md", '''## Reweight: a fader on one word (paper §3.2 "Attention re-weighting", Fig. 9)

Scale one word's attention column by `c` in the target (no renormalisation, as in the paper): above 1 the
word gets more say over every pixel, below 1 less, negative values push it away. The source is generated
alongside and all its maps are injected, so only the reweighted word's influence changes. One scale per
target prompt: here copies of the same prompt, one per `c`.

On this model the fader on `circle` acts on the circle's *size*, step by step: −5 shrinks it to less than half
(64 px against the source's 149), −2 to 91, 0 to 135, and 2 and 5 grow it (160, 175 px); 10 grows it further and
tints the background, 20 breaks the image. A fader on the color word does nothing here (docs/FIGURES.md, Fig. 9):
`red`'s column holds about 1% of the circle's attention (notebook 1).'''),
    ("code", '''PROMPT = "a red circle on a black background"
WORD = "circle"
SCALES = [-5.0, -2.0, 0.0, 1.0, 2.0, 5.0, 10.0, 20.0]

fader = EditSpec(kind="reweight", reweight={WORD: SCALES})
faded = edit(model, [PROMPT] * (1 + len(SCALES)), seed=3, spec=fader, settings=settings, progress=False)
areas = [sum(obj.area for obj in read_image(image).objects) for image in faded.images]  # object pixels, as read
display(views.image_grid(faded.images, [f"source: {areas[0]} px", *[f"{WORD} x {c:g}: {a} px" for c, a in zip(SCALES, areas[1:])]]))'''),
    ("md", '''## LocalBlend: change only where the edited word is (paper §3.2 "Local editing", Fig. 12)

Attention injection keeps the layout, but pixels away from the edit can still drift. `LocalBlend` turns the
edited word's own cross-attention into a mask (summed over the steps so far, dilated by a 3×3 max-pool,
divided by its maximum, thresholded at 0.3) and after every step copies the source's latent outside the
mask: `x_tgt ← x_src + mask·(x_tgt − x_src)`. In the paper's SD results the mask outlines the object.

On this model it does too: `circle`'s map is selective (notebook 1), and the mask covers the circle and
its neighbourhood, a quarter of the latent. Here the swap alone already keeps the circle in place and the gray
background as it was, so the blend has little left to protect: both change about 14% of the pixels, the circle's
own area. LocalBlend can keep only what is outside the mask *as the source drew it*, so it protects the rest of
an image (another object: `scripts/eval_edits.py` measures that, with `blend=local_tiny`), not an edit that
moves. `threshold` and `dilation` in `BlendSpec` are the knobs to try.'''),
    ("code", '''SWAP = ["a red circle on a gray background", "a blue circle on a gray background"]
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
    print(f"{name:18s} drawn as its caption: {score.target_correct!s:5s}  pixels changed by > 32/255: {changed.mean():.1%}")'''),
    ("md", '''## Object preservation: inject one word only (paper Fig. 5)

`preserve=["circle"]` injects only that word's maps (every other token gets an empty window) and no
self-attention, so that the circle keeps its place while the rest of the prompt — here the background — is
generated freely. On this model it helps, though not fully: without injection the circle on white is drawn
smaller and lower (IoU with the source 0.57) and shifts on gray (0.70); injecting only `circle` brings it closer
(0.75, 0.83); injecting every token (`kind="replace"`, which here swaps the background word) keeps it best (0.94,
0.90), because the padding tokens, which carry most of the attention, are injected too. Over seeds 0–19 the
same `circle`-only injection raises the circle's mean IoU from 0.41 to 0.62 (docs/FIGURES.md, Fig. 5).'''),
    ("code", '''SOURCE = "a red circle on a black background"
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
    print(f"{name:23s} circle IoU with the source: {', '.join(f'{iou:.2f}' for iou in ious)}")'''),
]

# ---------------------------------------------------------------------------------------------------------------
# 04: real images
# ---------------------------------------------------------------------------------------------------------------
NB04 = [
    ("md", '''# 4 · Real images: invert, reconstruct, edit

To edit an image the model did not generate, we first need the noise `x_T` it would have come from
(Mokady et al. 2023). **DDIM inversion** runs the deterministic sampler backwards from the image's latent.
That is exact only without classifier-free guidance; editing needs guidance, and sampling back from the
inverted noise with guidance drifts away from the image. **Null-text inversion** fixes the drift by
optimising, step by step, the *unconditional* ("empty prompt") embedding so that the guided sampler retraces
the inversion trajectory; the model's weights are untouched. **Negative-prompt inversion** (Miyake et al.
2023) is a cheap approximation: use the prompt's own embedding as the unconditional one.

Our "photo" is a scene rendered by the shapes world (`p2p/shapes/world.py`), with exact ground truth.'''),
    ("md", LOADING_MD + '''

Inversion costs more than sampling (null-text runs up to `INNER_STEPS` optimiser steps per DDIM step), so this
notebook defaults to 25 DDIM steps; on a laptop CPU the null-text inversion takes about ten seconds.

The guidance scale is 2.5 here, half the model's default. Null-text embeddings are optimised for the source
prompt; at guidance 5 the pull toward a *changed* prompt is amplified past what this small model tolerates:
the null-text edits grow the circle and tint the background (docs/FIGURES.md, Figs. 10–12; set
`guidance=model.config.guidance` below to see it).'''),
    ("code", setup_cell(25) + '''
INNER_STEPS = int(os.environ.get("P2P_NOTEBOOK_INNER_STEPS", "10"))  # null-text Adam steps per DDIM step (paper: 10)'''),
    ("code", '''import matplotlib.pyplot as plt
import numpy as np
from IPython.display import display

from models.loader import load_checkpoint
from p2p import views
from p2p.edit import EditSpec, edit
from p2p.real.inversion import image_to_tensor, invert, psnr
from p2p.shapes.metrics import score_edit
from p2p.pipeline import SamplerSettings, decode
from p2p.shapes.world import sample_scene

''' + load_model("2.5", "half the model's default: see above")),
    ("md", '''## The photo

A random layout, a caption that names what is there. The VAE alone sets the ceiling: encoding and decoding
the photo without any diffusion already loses some detail, and no inversion can beat that PSNR.'''),
    ("code", '''scene = sample_scene(np.random.default_rng(4), objects=[("red", "circle")], background="black", mention_background=True)
photo, caption = scene.image, scene.caption

vae_only = decode(model, model.encode_images(image_to_tensor(photo)))[0]  # VAE posterior mean, no diffusion
display(views.image_grid(np.stack([photo, vae_only]), [caption, f"VAE only: {psnr(vae_only, photo):.1f} dB"]))'''),
    ("md", '''## Invert three ways, reconstruct, compare

`invert` returns `x_T` and, for null-text and negative-prompt inversion, one unconditional embedding per
step. Reconstructing = sampling the caption from `x_T` with those embeddings (`edit` without an edit spec).
Plain DDIM inversion drifts (here about 1 dB below the others at guidance 2.5; at the model's guidance 5 the gap
grows, see `scripts/eval_inversion.py` in the model card); null-text inversion comes back within a fraction of a
dB of the VAE's ceiling; on this model negative-prompt inversion, with no optimisation at all, does as well.'''),
    ("code", '''METHODS = ["ddim", "null_text", "negative_prompt"]
inversions = {method: invert(model, photo, caption, method=method, settings=settings, inner_steps=INNER_STEPS,
                             progress=False) for method in METHODS}
reconstructions = {method: edit(model, [caption], latent=inversion.x_T, uncond_embeddings=inversion.uncond_embeddings,
                                settings=settings, progress=False).images[0]
                   for method, inversion in inversions.items()}
display(views.image_grid(np.stack([photo, *reconstructions.values()]),
                         ["photo", *[f"{method}: {psnr(image, photo):.1f} dB" for method, image in reconstructions.items()]]))'''),
    ("md", '''Null-text inversion stops optimising a step early once its loss is below `1e-5 + i·2e-5` (the reference's
tolerance), checked before each Adam step; the right plot shows how many steps each DDIM step took.'''),
    ("code", '''null_text = inversions["null_text"]
fig, (left, right) = plt.subplots(1, 2, figsize=(9, 2.8))
left.semilogy(range(1, STEPS + 1), null_text.losses)
left.set(xlabel="DDIM step", ylabel="final MSE to the trajectory")
right.bar(range(1, STEPS + 1), null_text.inner_steps)
right.set(xlabel="DDIM step", ylabel="Adam steps taken")
plt.tight_layout()
plt.show()'''),
    ("md", '''## Edit the photo: a color swap

The same word swap as notebook 2, now starting from the inverted `x_T` and using the inversion's
unconditional embeddings at every step, for source and targets alike (`self_replace_steps=0.5`, the
null-text paper's setting for real images). Under each edit: whether it reads as the target caption, the
layout IoU with the photo, and the PSNR of the background (the pixels outside the photo's circle). Both
inversions keep the circle in place and change its color; on this model the DDIM-inverted edits even keep
the black background cleaner (null-text's edits tint it slightly: 22.5–26.5 dB outside the circle against
26.5–29.5 dB, and its yellow is greenish), while null-text's strength is the faithful reconstruction above.'''),
    ("code", '''TARGETS = [caption.replace("red", "blue"), caption.replace("red", "yellow")]
swap = EditSpec(kind="replace", cross_replace_steps=0.8, self_replace_steps=0.5)
background = ~scene.objects[0].mask

for method in ["ddim", "null_text"]:
    inversion = inversions[method]
    result = edit(model, [caption, *TARGETS], latent=inversion.x_T, uncond_embeddings=inversion.uncond_embeddings,
                  spec=swap, settings=settings, progress=False)
    scores = [score_edit(photo, image, source_caption=caption, target_caption=target)
              for image, target in zip(result.images[1:], TARGETS)]
    print(f"{method} inversion + word swap")
    display(views.image_grid(np.stack([photo, *result.images]),
                             ["photo", "reconstruction",
                              *[f"{'ok' if s.target_correct else 'not read'}, IoU {s.iou:.2f}, "
                                f"background {psnr(image, photo, mask=background):.1f} dB"
                                for s, image in zip(scores, result.images[1:])]]))'''),
]

NOTEBOOKS = {
    "01_cross_attention_maps.ipynb": NB01,
    "02_word_swap.ipynb": NB02,
    "03_refine_reweight_blend_preserve.ipynb": NB03,
    "04_real_images.ipynb": NB04,
}


def build(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    notebook = new_notebook(cells=[new_markdown_cell(text) if kind == "md" else new_code_cell(text)
                                   for kind, text in cells])
    notebook.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                         "language_info": {"name": "python"}}
    return notebook


def notebooks() -> dict[str, nbformat.NotebookNode]:
    """Every notebook as it is committed: built from the cells above, stable cell ids, no outputs."""
    built = {}
    for name, cells in NOTEBOOKS.items():
        notebook = build(cells)
        for i, cell in enumerate(notebook.cells):  # stable ids: regenerating an unchanged notebook changes nothing
            cell.id = f"{name[:2]}-{i:02d}"
        nbformat.validate(notebook)
        built[name] = notebook
    return built


def main() -> None:
    for name, notebook in notebooks().items():
        nbformat.write(notebook, HERE / name)
        print(f"wrote {HERE / name} ({len(notebook.cells)} cells)")


if __name__ == "__main__":
    main()
