"""Editing quality of the built-in model, measured with the shapes world's reader (issues 3 and 7).

    python scripts/eval_edits.py                 # 200 seeds per study, the model's default sampler settings
    python scripts/eval_edits.py n=20 steps=25   # quick look

Studies (one-object captions unless said otherwise; each seed draws its own caption pair):
- color swap with injection (edit group, default cross 0.8 / self 0.4) vs same-seed sampling without it:
  target color reached, source–target object-mask IoU, IoU ≥ 0.8 rate; and the ceiling of that measurement:
  the IoU of the perfect edit (a render and the same layout in the new color, both through the model's VAE);
- which color swaps lose the layout: the distance between the two colors' latent codes (`color_latents`), in
  thirds of the judged swaps from the nearest pair of colors to the farthest;
- the same color swaps with the most injection the method has (cross and self maps replaced at every step, in
  every layer): how much of the layout attention alone can hold on this model;
- when sampling decides the layout: the step from which the source's predicted x0 keeps the final object mask
  (IoU ≥ 0.8) — P2P's self window (40% of the steps) can only hold a layout decided inside it;
- shape swap: centroid shift with and without injection;
- LocalBlend on two-object captions (swap one object's color, blend words = its shape): the fraction of the
  other object's pixels that stay unchanged, how much of it the blend mask covers (what the mask covers
  LocalBlend cannot protect), and whether the edited image reads as its caption. Blend settings: the `blend`
  group, by default `local_tiny` (`blend=local` for the reference's).
Writes `edits.json` (summaries + per-seed rows) into the run folder and prints a table.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from models.stable_diffusion import StableDiffusion
from p2p.edit import BlendSpec, EditSpec, edit
from p2p.pipeline import SamplerSettings, decode, generate
from p2p.real.inversion import image_to_tensor, mask_at, vae_reconstruction
from p2p.schedules import named_step_range
from p2p.shapes.metrics import edit_study, layout_commit_step, score_edit, summarize, unchanged_pixels
from p2p.shapes.reader import matches_caption, read_image
from p2p.shapes.world import WorldConfig, make_caption, parse_caption, render, sample_scene


def swap_pair(rng: np.random.Generator, world: WorldConfig, *, swap: str) -> tuple[str, str]:
    """A one-object caption and the same caption with its color (or shape) word swapped."""
    colors, shapes, backgrounds = list(world.colors), list(world.shapes), list(world.backgrounds)
    color, shape, background = rng.choice(colors), rng.choice(shapes), rng.choice(backgrounds)
    if swap == "color":
        new = rng.choice([c for c in colors if c != color])
        return make_caption([(color, shape)], background=background), make_caption(
            [(new, shape)], background=background
        )
    new = rng.choice([s for s in shapes if s != shape])
    return make_caption([(color, shape)], background=background), make_caption([(color, new)], background=background)


def perfect_color_swaps(model, world: WorldConfig, *, seed: int, n: int) -> list[dict]:
    """The IoU a color swap would score if the model kept the object exactly: a one-object render and the
    same layout in another color, both encoded and decoded by the model's VAE, scored like the edits."""
    rng, rows = np.random.default_rng([seed, 3]), []
    for _ in range(n):
        scene = sample_scene(rng, config=world, num_objects=1)
        obj = scene.objects[0]
        new = str(rng.choice([c for c in world.colors if c != obj.color]))
        recolored = render([dataclasses.replace(obj, color=new)], background=scene.background, config=world)
        source, target = vae_reconstruction(model, scene.image), vae_reconstruction(model, recolored)
        target_caption = make_caption([(new, obj.shape)], background=parse_caption(scene.caption).background)
        score = score_edit(source, target, source_caption=scene.caption, target_caption=target_caption)
        rows.append({"caption": scene.caption, "new_color": new, "iou": score.iou})
    return rows


@torch.no_grad()
def color_latents(model, world: WorldConfig, *, seed: int, n: int = 40) -> dict[tuple[str, str], np.ndarray]:
    """(color, background) → how the VAE writes that color on that background: the mean latent of the latent
    cells a rendered square covers entirely minus that of the cells it leaves empty, over `n` renders."""
    rng, codes = np.random.default_rng([seed, 4]), {}
    factor = model.config.latent_factor
    for background in world.backgrounds:
        for color in world.colors:
            offsets = []
            for _ in range(n):
                scene = sample_scene(
                    rng, config=world, objects=[(color, "square")], background=background, mention_background=True
                )
                latent = model.encode_images(image_to_tensor(scene.image))[0].float()  # (4, h, w)
                mask = torch.from_numpy(scene.objects[0].mask).float()[None, None]
                cover = F.avg_pool2d(mask, factor)[0, 0]  # (h, w): the fraction of each cell's pixels inside
                offsets.append((latent[:, cover > 0.99].mean(1) - latent[:, cover < 0.01].mean(1)).numpy())
            codes[(color, background)] = np.mean(offsets, axis=0)
    return codes


def kept_by_latent_distance(rows: list[dict], codes: dict, *, groups: int = 3) -> list[dict]:
    """Judged color swaps in `groups` equal parts by the distance of their colors' latent codes, nearest first."""
    judged = [r for r in rows if r["edit_source_correct"]]
    distance = []
    for r in judged:
        ((source_color, _),) = parse_caption(r["source"]).objects
        ((target_color, _),) = parse_caption(r["target"]).objects
        background = parse_caption(r["source"]).background  # one-object pairs name it (swap_pair)
        distance.append(float(np.linalg.norm(codes[(source_color, background)] - codes[(target_color, background)])))
    order = np.argsort(distance, kind="stable")
    parts = []
    for part in np.array_split(order, groups):
        if len(part) == 0:
            continue
        iou = np.array([judged[i]["edit_iou"] for i in part])
        parts.append(
            {
                "n": len(part),
                "latent_distance": [distance[part[0]], distance[part[-1]]],
                "mean_iou": float(iou.mean()),
                "kept_layout": float((iou >= 0.8).mean()),
            }
        )
    return parts


def commit_steps(model, captions, *, seeds, settings) -> list[int]:
    """layout_commit_step of each caption sampled alone with its seed (frames: each step's x̂0, then the image)."""
    steps = []
    for caption, seed in zip(captions, seeds):
        predictions = []
        final = generate(
            model,
            [caption],
            seed=seed,
            settings=settings,
            progress=False,
            on_prediction=lambda step, x0: predictions.append(x0),  # noqa: B023 (called now)
        )
        steps.append(layout_commit_step([*decode(model, torch.cat(predictions)), final[0]]))
    return steps


def blend_case(rng: np.random.Generator, world: WorldConfig) -> tuple[str, str, str, tuple[str, str]]:
    """Two objects of different shapes; the second one's color is swapped. Returns (source, target, word, kept)."""
    colors, shapes = list(world.colors), list(world.shapes)
    first_shape, second_shape = rng.choice(shapes, size=2, replace=False)
    first_color, second_color = rng.choice(colors, size=2, replace=False)
    new_color = rng.choice([c for c in colors if c not in (first_color, second_color)])
    background = rng.choice(list(world.backgrounds))
    source = make_caption([(first_color, first_shape), (second_color, second_shape)], background=background)
    target = make_caption([(first_color, first_shape), (new_color, second_shape)], background=background)
    return source, target, str(second_shape), (str(first_color), str(first_shape))


def blend_study(model, cases, *, seeds, spec: EditSpec, blend: dict, settings) -> list[dict]:
    rows = []
    for (source, target, word, kept), seed in zip(cases, seeds):
        result = edit(
            model,
            [source, target],
            seed=seed,
            spec=spec,
            settings=settings,
            progress=False,
            blend=BlendSpec(**{**blend, "words": [word]}),
        )
        reading = read_image(result.images[0])
        kept_objects = [o for o in reading.objects if (o.color, o.shape) == kept]
        row = {
            "source": source,
            "target": target,
            "seed": seed,
            "source_correct": bool(matches_caption(reading, source)["all"]),
            "target_correct": bool(matches_caption(read_image(result.images[1]), target)["all"]),
        }
        if kept_objects:  # judged wherever the kept object was drawn, even if the other one was not
            row["kept_object_unchanged"] = unchanged_pixels(result.images[0], result.images[1], kept_objects[0].mask)
            outside = result.blend.last_mask[1, 0] == 0  # latent positions the blend kept from the source
            in_mask = mask_at(result.blend.last_mask[1], result.images.shape[1:3]) > 0
            row["kept_object_in_mask"] = float(in_mask[kept_objects[0].mask].mean())  # blend could not protect these
            row["latent_outside_mask_equal"] = bool(
                torch.equal(result.latents[1][:, outside], result.latents[0][:, outside])
            )
        rows.append(row)
    return rows


def evaluate_edits(
    model: StableDiffusion, *, n: int, first_seed: int, spec: EditSpec, blend: dict, settings: SamplerSettings
) -> dict:
    """Every study of the module docstring over seeds first_seed … first_seed + n − 1 → the report (JSON-ready)."""
    world = WorldConfig()
    seeds = list(range(first_seed, first_seed + n))
    report = {
        "settings": {"steps": settings.steps, "guidance": settings.guidance, "n": n, "edit": dataclasses.asdict(spec)}
    }
    pairs = {}
    for swap in ("color", "shape"):
        rng = np.random.default_rng([first_seed, 0 if swap == "color" else 1])
        pairs[swap] = [swap_pair(rng, world, swap=swap) for _ in seeds]
        rows = []
        for pair, seed in zip(pairs[swap], seeds):
            rows += edit_study(model, [pair], seeds=[seed], spec=spec, settings=settings)
        report[f"{swap}_swap"] = {
            "edit": summarize(rows, prefix="edit"),
            "baseline": summarize(rows, prefix="baseline"),
            "rows": rows,
        }
    report["color_swap"]["by_latent_distance"] = kept_by_latent_distance(
        report["color_swap"]["rows"], color_latents(model, world, seed=first_seed)
    )
    most = dataclasses.replace(
        spec, cross_replace_steps=1.0, self_replace_steps=1.0, self_max_fraction=1.0, self_max_side=None
    )
    rows = []
    for pair, seed in zip(pairs["color"], seeds):
        rows += edit_study(model, [pair], seeds=[seed], spec=most, settings=settings, baseline=False)
    report["color_swap"]["most_injection"] = {**summarize(rows, prefix="edit"), "rows": rows}
    commits = np.array(commit_steps(model, [source for source, _ in pairs["color"]], seeds=seeds, settings=settings))
    window = named_step_range(spec.self_replace_steps, settings.steps, "self_replace_steps")
    report["layout_commit"] = {
        "n": len(commits),
        "steps": settings.steps,
        "self_window": [window.start, window.stop],
        "quartiles": [float(q) for q in np.percentile(commits, [25, 50, 75])],
        "p90": float(np.percentile(commits, 90)),
        "within_self_window": float(np.mean(commits <= window.stop)),
        "per_seed": commits.tolist(),
    }
    perfect = [r["iou"] for r in perfect_color_swaps(model, world, seed=first_seed, n=n)]
    report["color_swap"]["perfect_edit"] = {
        "n": len(perfect),
        "mean_iou": float(np.mean(perfect)),
        "kept_layout": float(np.mean(np.array(perfect) >= 0.8)),
    }
    rng = np.random.default_rng([first_seed, 2])
    cases = [blend_case(rng, world) for _ in seeds]
    rows = blend_study(model, cases, seeds=seeds, spec=spec, blend=blend, settings=settings)
    judged = [r for r in rows if "kept_object_unchanged" in r]
    report["local_blend"] = {
        "n": len(judged),
        "kept_object_fully_unchanged": float(np.mean([r["kept_object_unchanged"] == 1.0 for r in judged]))
        if judged
        else None,
        "kept_object_unchanged_pixels": float(np.mean([r["kept_object_unchanged"] for r in judged]))
        if judged
        else None,
        "target_correct": float(np.mean([r["target_correct"] for r in judged])) if judged else None,
        "latent_outside_mask_equal": float(np.mean([r["latent_outside_mask_equal"] for r in judged]))
        if judged
        else None,
        "kept_object_in_mask": float(np.mean([r["kept_object_in_mask"] for r in judged])) if judged else None,
        "rows": rows,
    }
    return report


def summary_lines(report: dict) -> list[str]:
    """The report's headline numbers, one line per study."""
    lines = []
    for swap in ("color", "shape"):
        for kind in ("edit", "baseline"):
            s = report[f"{swap}_swap"][kind]
            lines.append(
                f"{swap} swap {kind:<8} n={s.get('n')} success={s.get('success', float('nan')):.3f} "
                f"target colors={s.get('target_colors', float('nan')):.3f} "
                f"mean IoU={s.get('mean_iou', float('nan')):.3f} IoU>=0.8={s.get('kept_layout', float('nan')):.3f} "
                f"colors and IoU>=0.8={s.get('colors_and_kept', float('nan')):.3f} "
                f"median centroid shift={s.get('median_centroid_shift', float('nan')):.2f}px"
            )
    for part in report["color_swap"]["by_latent_distance"]:
        lines.append(
            f"color swaps whose colors' latent codes are {part['latent_distance'][0]:.2f}-"
            f"{part['latent_distance'][1]:.2f} apart: n={part['n']} mean IoU={part['mean_iou']:.3f} "
            f"IoU>=0.8={part['kept_layout']:.3f}"
        )
    s = report["color_swap"]["most_injection"]
    lines.append(
        f"color swap, cross and self injected at every step in every layer: n={s.get('n')} "
        f"target colors={s.get('target_colors', float('nan')):.3f} mean IoU={s.get('mean_iou', float('nan')):.3f} "
        f"IoU>=0.8={s.get('kept_layout', float('nan')):.3f}"
    )
    c = report["layout_commit"]
    lines.append(
        f"layout decided at step (of {c['steps']}, source x0 keeps the final mask from then on): quartiles "
        f"{c['quartiles']} p90 {c['p90']}; by the end of the self window (step {c['self_window'][1]}): "
        f"{c['within_self_window']:.3f}"
    )
    p = report["color_swap"]["perfect_edit"]
    lines.append(
        f"color swap perfect   n={p['n']} (the same layout recolored, through the VAE) mean IoU={p['mean_iou']:.3f} "
        f"IoU>=0.8={p['kept_layout']:.3f}"
    )
    lb = report["local_blend"]
    lines.append(
        f"local blend n={lb['n']} latent outside mask == source: {lb['latent_outside_mask_equal']} "
        f"other object fully unchanged={lb['kept_object_fully_unchanged']} "
        f"unchanged pixels={lb['kept_object_unchanged_pixels']} edited object right={lb['target_correct']} "
        f"other object inside the blend mask={lb['kept_object_in_mask']}"
    )
    return lines
