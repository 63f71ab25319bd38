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

# The repository root: the first folder upwards holding setup.py, so this runs from the repo or from notebooks/.
REPO = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "setup.py").is_file())
sys.path.insert(0, str(REPO))  # import models/ and p2p/ without installing the package
CHECKPOINT = Path(os.environ.get("P2P_TINY_CHECKPOINT", REPO / "models" / "weights" / "tiny.safetensors"))
STEPS = int(os.environ.get("P2P_NOTEBOOK_STEPS", "{default_steps}"))  # DDIM steps; the CI test runs fewer'''


LOAD_MODEL = '''model = load_checkpoint(CHECKPOINT)  # strict: every tensor of the file has its place, and nothing is missing
settings = SamplerSettings(steps=STEPS, guidance=model.config.guidance)  # the guidance the model was trained for
latent_side = model.config.image_size // model.config.latent_factor
print(f"{CHECKPOINT.name}: {model.config.image_size}×{model.config.image_size} px images, "
      f"{latent_side}×{latent_side} latents, {STEPS} DDIM steps, guidance {settings.guidance}")'''

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
    ("md", '''# 1 · Cross-attention maps: where each word goes

Stable Diffusion reads the prompt in its **cross-attention** layers: every pixel of a UNet feature map
(a *query*) takes a softmax over the prompt's 77 tokens (the *keys*), `M = softmax(QKᵀ/√d)`. Row *i* of `M`
says how much each token contributes to pixel *i*; column *j*, reshaped to the feature map, is token *j*'s
**attention map**.

Prompt-to-Prompt (Hertz et al. 2022, §3.1 and Fig. 4) rests on one observation, which this notebook shows on
the built-in model: the maps already hold the image's layout — each word's map covers the pixels of the
thing it names — and that layout is fixed within the first few denoising steps.'''),
    ("md", LOADING_MD),
    ("code", setup_cell(50)),
    ("code", '''import matplotlib.pyplot as plt
import torch
from IPython.display import display

from models.loader import load_checkpoint
from p2p import views
from p2p.edit import StoreSpec, edit
from p2p.pipeline import SamplerSettings
from p2p.tokens import word_token_positions

''' + LOAD_MODEL),
    ("md", '''## Generate an image and record its attention

`edit` is the entry point the scripts use (`scripts/generate.py`, `scripts/edit.py`, `scripts/figure.py`);
without an edit spec it is plain text-to-image sampling. `StoreSpec` attaches an `AttentionStore`
(`p2p/controllers.py`) that copies the maps of the conditional branch, averaged over heads, at every step;
`per_step=True` keeps each step separately as well as the running sum.

`max_fraction=1.0` records layers up to the latent's own side. The default (½, the reference's 32×32 layers at
512 px) would skip the tiny model's only pure cross-attention layers, which run at the full 8×8 latent.'''),
    ("code", '''PROMPT = "a red circle and a blue square on a black background"
SEED = 5
result = edit(model, [PROMPT], seed=SEED, settings=settings, store=StoreSpec(per_step=True, max_fraction=1.0),
              progress=False)
store = result.store
display(views.image_grid(result.images, [PROMPT]))'''),
    ("md", '''## Every token's map, averaged over layers and steps (paper Fig. 4)

One tile per token, start and end tokens included. Each tile is scaled to its own maximum, so compare
*where* a map is bright, not how bright. The shape words should cover their shapes and the color words the
objects they color; `background` and the color word before it cover the rest.'''),
    ("code", '''display(views.grid([views.cross_attention_tiles(store, PROMPT, 0)]))'''),
    ("md", '''## Per layer resolution

The tiny UNet reads text at three resolutions: plain cross-attention (`attn2`) at the latent's 8×8, and
hybrid attention (`attn1`, Imagen-style: the text keys are concatenated to the self-attention keys; the
store keeps their text columns) at 4×4 and 2×2. The sites are named by their `state_dict` prefix, the same
names the weights have. The coarse layers only say which half of the image a word is in; the 8×8 layers
carry its outline.'''),
    ("code", '''grids = sorted({site.query_hw for site in store.sites.values()}, reverse=True)
for grid_hw in grids:
    layers = [name for name, site in store.sites.items() if site.query_hw == grid_hw]
    print(f"{grid_hw[0]}×{grid_hw[1]}: {len(layers)} layers: {', '.join(layers)}")
    display(views.grid([views.cross_attention_tiles(store, PROMPT, 0, grids=[grid_hw])]))'''),
    ("md", '''## Step by step: the layout is decided first

Now the maps of single steps instead of the average. Each row follows one word from the first, noisiest
step to the last; the image is generated as the rows go right.'''),
    ("code", '''WORDS = ["circle", "square"]
shown = sorted({round(i * (STEPS - 1) / 5) for i in range(6)})  # six evenly spaced steps, first and last included
per_step = {step: views.token_maps(store, 0, step=step) for step in range(STEPS)}  # step → (77, 8, 8)
rows = [[views.captioned(views.heat(per_step[step][word_token_positions(PROMPT, word)].sum(dim=0)),
                         f"{word}, step {step + 1}") for step in shown] for word in WORDS]
display(views.grid(rows))'''),
    ("md", '''How early? Below, for each word, the correlation between its map at each step and its map at the last
step (1 = the same picture). It climbs close to its final value within the first few steps: where each
object goes is settled long before the image looks like anything, and the remaining steps only refine
colors and edges. This is why Prompt-to-Prompt injects the source's maps during the *first* part of the
run (notebook 2).'''),
    ("code", '''fig, ax = plt.subplots(figsize=(6, 3))
for word in WORDS:
    positions = word_token_positions(PROMPT, word)
    final = per_step[STEPS - 1][positions].sum(dim=0).flatten()
    ax.plot(range(1, STEPS + 1), [torch.corrcoef(torch.stack([per_step[step][positions].sum(dim=0).flatten(), final]))[0, 1]
                                  for step in range(STEPS)], label=word)
ax.set(xlabel="DDIM step", ylabel="correlation with the last step", ylim=(-0.1, 1.05))
ax.legend()
plt.show()'''),
]

# ---------------------------------------------------------------------------------------------------------------
# 02: word swap
# ---------------------------------------------------------------------------------------------------------------
NB02 = [
    ("md", '''# 2 · Word swap: keep the picture, change one word

Generate an image, change one word of its prompt, generate again from the *same* seed: the new image
usually does not keep the old one's layout, because a different prompt steers the same noise elsewhere.
Prompt-to-Prompt (Hertz et al. 2022, §3.2 "Word swap", Figs. 2 and 6) fixes this by generating source and
target together and, during the first part of the run, giving the target the source's cross-attention maps
(notebook 1 showed that these maps hold the layout). The target's own words still supply the *values*, so
the swapped word changes what is drawn, not where.'''),
    ("md", LOADING_MD),
    ("code", setup_cell(50)),
    ("code", '''from IPython.display import display

from models.loader import load_checkpoint
from p2p import views
from p2p.edit import EditSpec, edit
from p2p.metrics import score_edit
from p2p.pipeline import SamplerSettings

''' + LOAD_MODEL),
    ("md", '''## Same seed, no injection

Source first, then the targets; all start from one shared initial latent `x_T` (`p2p.pipeline.initial_latent`).
Without an edit spec nothing touches the attention. `score_edit` reads every image with the shapes world's
reader (`p2p/reader.py`): whether the target is drawn as its caption says, and the IoU of the objects'
masks between source and target — 1 means the layout was kept exactly.'''),
    ("code", '''SOURCE = "a red circle on a black background"
TARGETS = ["a blue circle on a black background", "a red square on a black background",
           "a red triangle on a black background"]
PROMPTS = [SOURCE, *TARGETS]
SEED = 3

plain = edit(model, PROMPTS, seed=SEED, settings=settings, progress=False)
display(views.image_grid(plain.images, PROMPTS))
for target, image in zip(TARGETS, plain.images[1:]):
    score = score_edit(plain.images[0], image, source_caption=SOURCE, target_caption=target)
    print(f"{target:40s} drawn as its caption: {score.target_correct!s:5s}  layout IoU with the source: {score.iou:.2f}")'''),
    ("md", '''## With injection: one line of config

`kind="replace"` maps each source token's map to the target token in the same place (the swapped word gets the
swapped word's map), for the first 80% of the steps (`cross_replace_steps`); `self_replace_steps=0.4` also
copies the source's self-attention maps in the coarse layers during the first 40% — the paper's defaults.
The edit is an `AttentionEdit` controller (`p2p/controllers.py`), the same one `scripts/edit.py edit=replace` builds.'''),
    ("code", '''swap = EditSpec(kind="replace", cross_replace_steps=0.8, self_replace_steps=0.4)

injected = edit(model, PROMPTS, seed=SEED, spec=swap, settings=settings, progress=False)
display(views.image_grid(injected.images, PROMPTS))
for target, image in zip(TARGETS, injected.images[1:]):
    score = score_edit(injected.images[0], image, source_caption=SOURCE, target_caption=target)
    print(f"{target:40s} drawn as its caption: {score.target_correct!s:5s}  layout IoU with the source: {score.iou:.2f}")'''),
    ("md", '''## The injection fraction, as a slider (paper Fig. 6)

One row per target, one column per fraction of the steps during which the source's cross-attention maps are
injected (self-attention is left alone here, as in the paper's figure). At 0 it is plain same-seed sampling;
the more steps are injected, the more of the source's layout the target keeps — and at 100% the
target can be held so tightly to the source's maps that a shape swap no longer happens.
Under each tile: the layout IoU with the source, and whether the target reads as its caption.'''),
    ("code", '''FRACTIONS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
sweep = {f: edit(model, PROMPTS, seed=SEED, settings=settings, progress=False,
                 spec=EditSpec(kind="replace", cross_replace_steps=f, self_replace_steps=0.0))
         for f in FRACTIONS}
for t, target in enumerate(TARGETS, start=1):
    scores = {f: score_edit(result.images[0], result.images[t], source_caption=SOURCE, target_caption=target)
              for f, result in sweep.items()}
    print(target)
    display(views.image_grid([result.images[t] for result in sweep.values()],
                             [f"{f:.0%}: IoU {s.iou:.2f}, {'ok' if s.target_correct else 'not drawn'}"
                              for f, s in scores.items()]))'''),
]

# ---------------------------------------------------------------------------------------------------------------
# 03: refine, reweight, LocalBlend, object preservation
# ---------------------------------------------------------------------------------------------------------------
NB03 = [
    ("md", '''# 3 · Refine, reweight, LocalBlend, object preservation

Word swap (notebook 2) is one of several edits the paper builds from the same idea — control the target's
attention maps with the source's. Each one below is **one line of config** (an `EditSpec` or a `BlendSpec`,
the schemas of the scripts' `edit=` and `blend=` config groups), run through the same `edit` call and the
same controllers as `scripts/edit.py`. Every section compares with plain same-seed sampling.'''),
    ("md", LOADING_MD),
    ("code", setup_cell(50)),
    ("code", '''from IPython.display import display

from models.loader import load_checkpoint
from p2p import views
from p2p.edit import BlendSpec, EditSpec, edit
from p2p.metrics import score_edit
from p2p.pipeline import SamplerSettings
from p2p.tokens import decode_tokens, refine_alignment

''' + LOAD_MODEL),
    ("md", '''## Refine: add words (paper §3.2 "Adding a new phrase", Fig. 7)

The target prompt adds words, so tokens no longer line up one to one. `kind="refine"` aligns the two token
sequences (a longest common subsequence) and injects the source's maps into the target tokens that have a
partner; new tokens keep their own maps, so the new words can draw something new while the existing words
keep their places.'''),
    ("code", '''SOURCE = "a red circle on a black background"
TARGETS = ["a red circle and a blue square on a black background",
           "a red circle and a green triangle on a black background"]
SEED = 3

_, aligned = refine_alignment(SOURCE, TARGETS[0])
print("new tokens in the first target:", [token for token, a in zip(["<start>", *decode_tokens(TARGETS[0])], aligned) if a == 0])'''),
    ("code", '''refine = EditSpec(kind="refine", cross_replace_steps=0.8, self_replace_steps=0.4)

plain = edit(model, [SOURCE, *TARGETS], seed=SEED, settings=settings, progress=False)
refined = edit(model, [SOURCE, *TARGETS], seed=SEED, spec=refine, settings=settings, progress=False)
print("top: same seed, no injection; bottom: refine")
display(views.image_grid([*plain.images, *refined.images], [SOURCE, *TARGETS] * 2, columns=1 + len(TARGETS)))'''),
    ("md", '''## Reweight: a fader on one word (paper §3.2 "Attention re-weighting", Fig. 9)

Scale one word's attention column by `c` in the target: above 1 the word gets more say over every pixel,
below 1 less, negative values push it away. The source is generated alongside and its maps are
injected, so the rest of the picture stays put. One scale per target prompt: here six copies of the same
prompt, one per `c`.'''),
    ("code", '''PROMPT = "a red circle and a blue square on a black background"
WORD = "square"
SCALES = [-2.0, 0.0, 0.5, 1.0, 2.0, 5.0]

fader = EditSpec(kind="reweight", reweight={WORD: SCALES})
faded = edit(model, [PROMPT] * (1 + len(SCALES)), seed=SEED, spec=fader, settings=settings, progress=False)
display(views.image_grid(faded.images, ["source", *[f"{WORD} x {c:g}" for c in SCALES]]))'''),
    ("md", '''## LocalBlend: change only where the edited word is (paper §3.2 "Local editing", Fig. 12)

Attention injection keeps the layout, but pixels away from the edit can still drift. `LocalBlend` turns the
edited word's own cross-attention into a mask (averaged over steps, dilated, thresholded) and, after every
step, copies the source's latent outside the mask: `x_tgt ← x_src + mask·(x_tgt − x_src)`. Below: the word
swap alone, then with the blend, its mask, and how much of the background changed (fraction of pixels
outside both images' objects whose color moved by more than 32 of 255).'''),
    ("code", '''SWAP = [PROMPT, "a red circle and a green square on a black background"]
swap = EditSpec(kind="replace", cross_replace_steps=0.8, self_replace_steps=0.4)

unblended = edit(model, SWAP, seed=SEED, spec=swap, settings=settings, progress=False)
blended = edit(model, SWAP, seed=SEED, spec=swap, blend=BlendSpec(words=["square"]), settings=settings, progress=False)
display(views.grid([[views.captioned(unblended.images[0], "source"), views.captioned(unblended.images[1], "swap only"),
                     views.captioned(blended.images[1], "swap + LocalBlend"),
                     *views.mask_tiles(blended.blend.last_mask[1:], ["blend mask"])]]))
for name, result in (("swap only", unblended), ("swap + LocalBlend", blended)):
    score = score_edit(result.images[0], result.images[1], source_caption=SWAP[0], target_caption=SWAP[1])
    print(f"{name:18s} drawn as its caption: {score.target_correct!s:5s}  background changed: {score.background_changed:.1%}")'''),
    ("md", '''## Object preservation: inject one word only (paper Fig. 5)

`preserve=["circle"]` injects only that word's maps (every other token gets an empty window) and no
self-attention, so the circle keeps its place and shape while the rest of the prompt — the background,
a new object — is generated freely.'''),
    ("code", '''CONTEXTS = ["a red circle on a white background", "a red circle on a gray background",
            "a red circle and a blue square on a gray background"]
preserve = EditSpec(kind="refine", preserve=["circle"], self_replace_steps=0.0)

plain = edit(model, [SOURCE, *CONTEXTS], seed=SEED, settings=settings, progress=False)
kept = edit(model, [SOURCE, *CONTEXTS], seed=SEED, spec=preserve, settings=settings, progress=False)
print("top: same seed, no injection; bottom: only 'circle' injected")
display(views.image_grid([*plain.images, *kept.images], [SOURCE, *CONTEXTS] * 2, columns=1 + len(CONTEXTS)))'''),
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

Our "photo" is a scene rendered by the shapes world (`p2p/world.py`), with exact ground truth.'''),
    ("md", LOADING_MD + '''

Inversion costs more than sampling (null-text runs up to `INNER_STEPS` optimiser steps per DDIM step),
so this notebook defaults to 25 DDIM steps.'''),
    ("code", setup_cell(25) + '''
INNER_STEPS = int(os.environ.get("P2P_NOTEBOOK_INNER_STEPS", "5"))  # null-text Adam steps per DDIM step (paper: 10)'''),
    ("code", '''import matplotlib.pyplot as plt
import numpy as np
from IPython.display import display

from models.loader import load_checkpoint
from p2p import views
from p2p.edit import EditSpec, edit
from p2p.inversion import image_to_tensor, invert, psnr
from p2p.metrics import score_edit
from p2p.pipeline import SamplerSettings, decode
from p2p.world import sample_scene

''' + LOAD_MODEL),
    ("md", '''## The photo

A random layout, a caption that names what is there. The VAE alone sets the ceiling: encoding and decoding
the photo without any diffusion already loses some detail, and no inversion can beat that PSNR.'''),
    ("code", '''scene = sample_scene(np.random.default_rng(4), objects=[("red", "circle")], background="black", mention_background=True)
photo, caption = scene.image, scene.caption

vae_only = decode(model, model.encode_images(image_to_tensor(photo)))[0]  # VAE posterior mean, no diffusion
display(views.image_grid(np.stack([photo, vae_only]), [caption, f"VAE only: {psnr(vae_only, photo):.1f} dB"]))'''),
    ("md", '''## Invert three ways, reconstruct, compare

`invert` returns `x_T` and, for null-text and negative-prompt inversion, one unconditional embedding per
step. Reconstructing = sampling the caption from `x_T` with those embeddings (`edit` without an edit spec).'''),
    ("code", '''METHODS = ["ddim", "null_text", "negative_prompt"]
inversions = {method: invert(model, photo, caption, method=method, settings=settings, inner_steps=INNER_STEPS,
                             progress=False) for method in METHODS}
reconstructions = {method: edit(model, [caption], latent=inversion.x_T, uncond_embeddings=inversion.uncond_embeddings,
                                settings=settings, progress=False).images[0]
                   for method, inversion in inversions.items()}
display(views.image_grid(np.stack([photo, *reconstructions.values()]),
                         ["photo", *[f"{method}: {psnr(image, photo):.1f} dB" for method, image in reconstructions.items()]]))'''),
    ("md", '''Null-text inversion spends its optimiser steps where the guided sampler drifts most; it stops a step
early once the loss is below a tolerance that grows with the step.'''),
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
layout IoU with the photo, and the PSNR of the background (the pixels outside the circle) to the photo.'''),
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
                              *[f"{'ok' if s.target_correct else 'not drawn'}, IoU {s.iou:.2f}, "
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


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        notebook = build(cells)
        for i, cell in enumerate(notebook.cells):  # stable ids: regenerating an unchanged notebook changes nothing
            cell.id = f"{name[:2]}-{i:02d}"
        nbformat.validate(notebook)
        nbformat.write(notebook, HERE / name)
        print(f"wrote {HERE / name} ({len(cells)} cells)")


if __name__ == "__main__":
    main()
