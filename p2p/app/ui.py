"""The page: Gradio Blocks over `p2p.interactive.LiveEditor` (issue 28).

Three API endpoints, callable with `gradio_client` (`client.predict(..., api_name="/edit")`):
- `/edit` (EDIT_CONTROLS + photo id → grid, kind reason): runs on every slider release, text submit and choice, no button needed;
- `/attention` (the same → cross-attention tiles, LocalBlend mask, self-attention components), chained after it;
- `/invert` (photo, caption, method, steps, guidance → photo id, reconstruction, status, source prompt).
`/download` writes the current result's files. A user's mistake is a `UserError`, shown as the page's one-line
error (gr.Error); anything else is logged with its traceback and shown as "internal error". The queue runs one
request at a time.
"""

from __future__ import annotations

import functools
import html
import itertools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from models.errors import UserError
from models.stable_diffusion import StableDiffusion
from p2p.app import results
from p2p.app.photos import INVERSIONS, Photo, Photos
from p2p.app.requests import KINDS, MAX_STEPS, REWEIGHT_RANGE, EditRequest, edit_request
from p2p.edit import StoreSpec
from p2p.interactive import LiveEditor, Start
from p2p.tokens import words

log = logging.getLogger(__name__)

KEPT_RESULTS = 4  # the last results, so /attention and /download reuse /edit's instead of recomputing


@dataclass
class AppSettings:
    """What scripts/app.py passes in (conf/app.yaml)."""

    model_config: dict  # cfg.model, written into every download's config.yaml
    source: str = "a red circle on a black background"
    target: str = "a blue circle on a black background"
    seed: int = 3
    steps: int = 25
    guidance: float = 5.0
    blend_threshold: float = 0.4
    output_dir: Path = Path("outputs/app")
    cache_dir: Path | None = Path(".cache/inversions")
    store: StoreSpec | None = None  # the maps the views record; None: `views_store(model)`


# The views record every cross and self layer of a small latent (the built-in model's 8×8: a few MB); on SD's 64×64
# latent a self map is 4096² per layer, so only layers up to latent/4 (16² at 512 px, the reference's views).
SMALL_LATENT_SIDE = 16


def views_store(model: StableDiffusion) -> StoreSpec:
    side = model.config.image_size // model.config.latent_factor
    return StoreSpec(kinds=("cross", "self"), max_fraction=1.0 if side <= SMALL_LATENT_SIDE else 0.25)


def shown_errors(fn):
    """UserError → the page's one-line error; any other exception is a bug: logged in full, named on the page."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except UserError as err:
            raise gr.Error(html.escape(str(err), quote=False), print_exception=False) from None
        except Exception as err:
            log.exception("internal error while serving %s", fn.__name__)
            raise gr.Error(
                f"internal error ({type(err).__name__}); the server's log has the details", print_exception=False
            ) from None

    return wrapped


class Editor:
    """The server's state: one model, its source cache, the inverted photos, the last results."""

    def __init__(self, model: StableDiffusion, settings: AppSettings):
        self.model, self.settings = model, settings
        self.store = settings.store or views_store(model)
        self.live = LiveEditor(model)
        self.photos = Photos(model, cache_dir=settings.cache_dir)
        self.kept: OrderedDict[tuple, results.Shown] = OrderedDict()
        self.downloads = itertools.count()

    def shown(self, *values, maps: bool) -> results.Shown:
        """The edit the page's values ask for; with `maps`, its attention maps recorded too (for the views and the
        download). The grid alone records nothing: a quarter faster on the built-in model, and the slider's image
        is what a user waits for."""
        *controls, photo_id = values
        request = edit_request(**dict(zip(EDIT_CONTROLS, controls)))
        for key in [(request.key, photo_id, True)] + ([] if maps else [(request.key, photo_id, False)]):
            if key in self.kept:
                self.kept.move_to_end(key)
                return self.kept[key]
        key = (request.key, photo_id, maps)
        start, photo = self.start(request, photo_id)
        result = self.live.edit(
            request.prompts,
            start=start,
            spec=request.spec,
            blend=request.blend,
            store=self.store if maps else None,
            settings=request.settings,
        )
        baseline = self.live.baseline(request.prompts, start=start, settings=request.settings)
        self.kept[key] = results.Shown(request=request, result=result, baseline=baseline, photo=photo)
        while len(self.kept) > KEPT_RESULTS:
            self.kept.popitem(last=False)
        return self.kept[key]

    def start(self, request: EditRequest, photo_id: str) -> tuple[Start, Photo | None]:
        if not (photo_id or "").strip():
            return Start(seed=request.seed), None
        photo = self.photos.get(photo_id.strip())
        photo.check(request.prompts[0], request.settings)
        return photo.start, photo

    @shown_errors
    def edit(self, *values):
        shown = self.shown(*values, maps=False)
        return results.grid(shown), shown.request.kind_reason

    @shown_errors
    def attention(self, *values):
        shown = self.shown(*values, maps=True)
        return results.cross_attention(shown), results.blend_mask(shown), results.self_attention(shown)

    @shown_errors
    def download(self, *values):
        shown = self.shown(*values, maps=True)
        out = self.settings.output_dir / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{next(self.downloads):04d}"
        return [str(p) for p in results.save(shown, out, model_config=self.settings.model_config)]

    @shown_errors
    def invert(self, image_path, caption, method, steps, guidance, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 (Gradio finds its progress bar by this default)
        """The inversion's tqdm bars (p2p/real/inversion.py) become the page's progress bar."""
        photo = self.photos.invert(image_path, caption, method=method, steps=steps, guidance=guidance)
        status = (
            f"{photo.method}: {photo.seconds:.1f} s{' (from the cache)' if photo.from_cache else ''}; "
            f"reconstruction PSNR {photo.psnr:.1f} dB. Edits now start from this photo; clear the photo id "
            "to go back to seeds."
        )
        return photo.key, photo.reconstruction, status, photo.caption

    @staticmethod
    def reweight_words(targets: str):
        return gr.Dropdown(choices=word_choices(targets))


def word_choices(targets: str) -> list[str]:
    """The fader's word picker: every word of the targets ("" = no reweight)."""
    return [""] + sorted({w for line in (targets or "").splitlines() for w in words(line)}, key=str.lower)


EDIT_CONTROLS = (
    "source",
    "targets",
    "kind",
    "reweight_word",
    "reweight_scale",
    "cross_start",
    "cross_end",
    "self_fraction",
    "windows",
    "blend",
    "blend_threshold",
    "restore_pixels",
    "seed",
    "steps",
    "guidance",
)


def build_app(model: StableDiffusion, settings: AppSettings) -> gr.Blocks:
    editor = Editor(model, settings)
    with gr.Blocks(title="Prompt-to-Prompt, live") as app:
        gr.Markdown(
            "## Prompt-to-Prompt, live\nType a source and a target prompt; every slider re-renders the edit. "
            "The source branch is cached, so a slider move recomputes the targets only."
        )
        with gr.Row():
            with gr.Column(scale=1):
                source = gr.Textbox(settings.source, label="source prompt", elem_id="source")
                targets = gr.Textbox(settings.target, label="target prompts (one per line)", lines=2, elem_id="targets")
                kind = gr.Radio(list(KINDS), value="auto", label="edit kind")
                reason = gr.Textbox(label="why this kind", interactive=False, elem_id="reason")
                cross_start = gr.Slider(
                    0, 1, 0.0, step=0.02, label="cross-attention injection: start", elem_id="cross_start"
                )
                cross_end = gr.Slider(0, 1, 0.8, step=0.02, label="cross-attention injection: end", elem_id="cross_end")
                self_fraction = gr.Slider(0, 1, 0.4, step=0.02, label="self-attention injection (fraction)")
                with gr.Row():
                    reweight_word = gr.Dropdown(
                        word_choices(settings.target), value="", label="reweight word", allow_custom_value=True
                    )
                    reweight_scale = gr.Slider(*REWEIGHT_RANGE, 1.0, step=0.1, label="fader (reweight scale)")
                windows = gr.Textbox(
                    label="per-word windows, one 'word: start-end' per line", lines=2, placeholder="blue: 0-0.5"
                )
                with gr.Group():
                    with gr.Row():
                        blend = gr.Textbox(label="LocalBlend words ('circle', or 'red | blue' per prompt)")
                        blend_threshold = gr.Slider(
                            0, 0.95, settings.blend_threshold, step=0.05, label="LocalBlend threshold"
                        )
                    restore_pixels = gr.Checkbox(True, label="keep the source's pixels outside the mask")
                with gr.Row():
                    seed = gr.Number(settings.seed, label="seed", precision=0)
                    steps = gr.Number(settings.steps, label=f"steps (1–{MAX_STEPS})", precision=0)
                    guidance = gr.Number(settings.guidance, label="guidance")
                run = gr.Button("render", variant="primary")
            with gr.Column(scale=2):
                grid = gr.Image(
                    label="source, edits and the same-seed baseline",
                    format="png",
                    type="pil",
                    elem_id="grid",
                    interactive=False,
                )
                with gr.Accordion("photo: upload, caption, invert", open=False):
                    # a File, not an Image: gr.Image decodes uploads itself and fails on a non-image with a traceback;
                    # here p2p.real.images.load_image reads it and names what is wrong in one line
                    photo = gr.File(label="photo (an image file)", file_types=["image"], type="filepath")
                    caption = gr.Textbox(label="caption (becomes the source prompt)")
                    method = gr.Radio(list(INVERSIONS), value="null_text_fast", label="inversion")
                    invert = gr.Button("invert")
                    photo_id = gr.Textbox(label="photo id (empty: start from the seed)", elem_id="photo_id")
                    reconstruction = gr.Image(label="reconstruction", format="png", type="numpy", interactive=False)
                    status = gr.Textbox(label="inversion", interactive=False)
                cross_maps = gr.Image(
                    label="cross-attention per token (paper Fig. 4)", format="png", type="pil", interactive=False
                )
                mask = gr.Image(label="LocalBlend mask", format="png", type="pil", interactive=False)
                self_maps = gr.Image(label="self-attention components", format="png", type="pil", interactive=False)
                save = gr.Button("download this result with its config")
                files = gr.File(label="files (as scripts/edit.py writes them)", file_count="multiple")

        inputs = [
            source,
            targets,
            kind,
            reweight_word,
            reweight_scale,
            cross_start,
            cross_end,
            self_fraction,
            windows,
            blend,
            blend_threshold,
            restore_pixels,
            seed,
            steps,
            guidance,
            photo_id,
        ]
        triggers = [
            run.click,
            source.submit,
            targets.submit,
            kind.input,
            reweight_word.input,
            windows.submit,
            blend.submit,
            restore_pixels.input,
            seed.submit,
            steps.submit,
            guidance.submit,
            photo_id.submit,
            app.load,
        ] + [s.release for s in (cross_start, cross_end, self_fraction, reweight_scale, blend_threshold)]
        gr.on(triggers, editor.edit, inputs, [grid, reason], api_name="edit", trigger_mode="always_last").then(
            editor.attention, inputs, [cross_maps, mask, self_maps], api_name="attention", trigger_mode="always_last"
        )
        targets.change(editor.reweight_words, targets, reweight_word, api_visibility="private")
        invert.click(
            editor.invert,
            [photo, caption, method, steps, guidance],
            [photo_id, reconstruction, status, source],
            api_name="invert",
        ).success(editor.edit, inputs, [grid, reason], api_visibility="private").then(
            editor.attention, inputs, [cross_maps, mask, self_maps], api_visibility="private"
        )
        save.click(editor.download, inputs, files, api_name="download")
    return app
