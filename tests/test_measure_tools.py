"""The measuring tools behind docs/benchmarks.md's memory tables: peak_memory.py and random_checkpoint.py."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from conftest import REPO_ROOT
from safetensors import safe_open

from p2p.experiments.peak import run_measured

ALLOCATE = "import numpy, time; a = numpy.ones({n}, dtype=numpy.uint8); time.sleep(0.6); raise SystemExit({code})"


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / name), *args], capture_output=True, text=True, cwd=REPO_ROOT
    )


def test_peak_memory_sees_a_child_s_allocation_and_keeps_its_exit_status(tmp_path):
    small = run_measured([sys.executable, "-c", ALLOCATE.format(n=1, code=0)], interval=0.05)
    large = run_measured(
        [sys.executable, "-c", ALLOCATE.format(n=300 * 2**20, code=3)], interval=0.05, json_path=tmp_path / "m.json"
    )
    assert small.returncode == 0 and large.returncode == 3
    # numpy.ones touches every page: 300 MiB of anonymous memory more than the same interpreter without it
    assert large.peak_anon_bytes - small.peak_anon_bytes > 250 * 2**20
    assert large.peak_rss_bytes >= large.peak_anon_bytes
    assert json.loads((tmp_path / "m.json").read_text())["peak_anon_bytes"] == large.peak_anon_bytes


def test_peak_memory_script_reports_and_refuses_bad_input(tmp_path):
    done = script("peak_memory.py", "--json", str(tmp_path / "a.json"), "--", sys.executable, "-c", "pass")
    assert done.returncode == 0 and "peak RssAnon" in done.stdout
    again = script("peak_memory.py", "--json", str(tmp_path / "a.json"), "--", sys.executable, "-c", "pass")
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "a.json exists" in again.stderr
    missing = script("peak_memory.py", "--", "no-such-program-here")
    assert missing.returncode == 2 and "no-such-program-here" in missing.stderr and "Traceback" not in missing.stderr


def test_random_checkpoint_writes_every_listed_tensor(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(
        "# a header line\nblock.weight\t[4, 3]\nblock.bias\t[4]\n"
        "text.embeddings.position_ids\t[1, 7]\ndenoiser.sigmas\t[5]\nmodel.logit_scale\t[]\n"
    )
    out = tmp_path / "random.safetensors"
    done = script("random_checkpoint.py", "--keys", str(keys), "--dtype", "bf16", "--out", str(out))
    assert done.returncode == 0, done.stderr
    with safe_open(str(out), framework="pt") as file:
        tensors = {name: file.get_tensor(name) for name in file.keys()}
    assert {name: tuple(t.shape) for name, t in tensors.items()} == {
        "block.weight": (4, 3),
        "block.bias": (4,),
        "text.embeddings.position_ids": (1, 7),
        "denoiser.sigmas": (5,),
        "model.logit_scale": (),
    }
    assert tensors["block.weight"].dtype == torch.bfloat16 and tensors["denoiser.sigmas"].dtype == torch.float32
    assert torch.equal(tensors["text.embeddings.position_ids"], torch.arange(7)[None])
    assert 0.0 < tensors["block.weight"].float().abs().max() <= 3**-0.5  # U(±1/√fan_in)
    again = script("random_checkpoint.py", "--keys", str(keys), "--out", str(out))
    assert again.returncode == 2 and "exists" in again.stderr
    bad = script("random_checkpoint.py", "--keys", str(tmp_path / "none.txt"), "--out", str(tmp_path / "x.safetensors"))
    assert bad.returncode == 2 and "none.txt" in bad.stderr
