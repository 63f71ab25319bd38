"""PIE-Bench with P2P (issue 27): invert, edit and score every entry of a PIE-Bench folder; sharded, resumable.

    python scripts/benchmark.py data=DIR model=tiny inversion=direct steps=50 summarize=true
    python scripts/benchmark.py -m hydra/launcher=submitit_local data=DIR shard='range(4)' n_shards=4
    python scripts/benchmark.py -m hydra/launcher=submitit_slurm data=DIR model=sd14 model.checkpoint=SD14 \
        shard='range(50)' n_shards=50 hydra.launcher.gpus_per_node=1 hydra.launcher.timeout_min=240

Writes into its run folder (shards of one setting share it): annotation_images/<image_path> (the edited images, the
layout PIE-Bench's evaluate.py reads), rows/<key>.json (one per complete entry), results.csv (every complete entry)
and settings.json; with summarize=true also summary.csv / summary.md. A rerun into the same folder
(hydra.run.dir=… or hydra.sweep.dir=…) skips the complete entries.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.errors import OutputExistsError, UserError  # noqa: E402
from p2p.edit import BlendSpec, EditSpec  # noqa: E402
from p2p.experiments.pie_bench import BenchSettings, run_benchmark, shard_keys  # noqa: E402
from p2p.experiments.pie_metrics import MetricSet, NetworkPaths  # noqa: E402
from p2p.experiments.pie_report import write_summary  # noqa: E402
from p2p.real.inversion import check_tolerance_scale  # noqa: E402
from p2p.real.photo import InversionSettings  # noqa: E402
from p2p.shapes.pie import read_mapping  # noqa: E402
from scripts._cli import entry_point  # noqa: E402
from scripts._common import load_model, number, run_dir, sampler_settings, save_config  # noqa: E402


def bench_settings(cfg: DictConfig, model) -> BenchSettings:
    inversion = InversionSettings(**OmegaConf.to_container(cfg.inversion, resolve=True))
    check_tolerance_scale(inversion.tolerance_scale)
    edit = OmegaConf.to_container(cfg.edit, resolve=True)
    edit["reweight"] = edit.get("reweight") or {}
    blend = OmegaConf.to_container(cfg.blend, resolve=True)
    blend = BlendSpec(**{**blend, "words": []}) if set(blend) != {"words"} else None  # blend=none: no LocalBlend
    return BenchSettings(
        model=f"{cfg.model.name}:{cfg.model.get('checkpoint') or 'built-in'}",
        inversion=inversion,
        edit=EditSpec(**edit),
        blend=blend,
        sampler=sampler_settings(cfg, model),
        seed=number(cfg.seed, name="seed", kind=int),
    )


@entry_point("benchmark")
def main(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "data"):
        raise UserError("data is required: pass data=PATH/TO/PIE-Bench (mapping_file.json + annotation_images/)")
    shard_keys(list(read_mapping(cfg.data)), shard=cfg.shard, n_shards=cfg.n_shards)  # before the model loads
    out = run_dir()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    metrics = MetricSet(NetworkPaths(**OmegaConf.to_container(cfg.metrics, resolve=True)))
    model = load_model(cfg)
    try:  # the first shard's config.yaml stays (shards share the folder); settings.json guards against mixing runs
        save_config(cfg, out)
    except OutputExistsError:
        pass
    counts = run_benchmark(
        model,
        cfg.data,
        out,
        settings=bench_settings(cfg, model),
        metrics=metrics,
        shard=cfg.shard,
        n_shards=cfg.n_shards,
        cache_dir=cfg.cache_dir,
        limit=cfg.limit,
        progress=cfg.progress,
    )
    print(
        f"shard {cfg.shard}/{cfg.n_shards}: {counts['done']} entries edited, {counts['skipped']} already complete; "
        f"{out / 'results.csv'}"
    )
    if cfg.summarize:
        print(f"summary: {write_summary(out, label=f'{cfg.inversion.method} + P2P ({cfg.model.name})')[1]}")


if __name__ == "__main__":
    main()
