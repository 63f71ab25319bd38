"""The house style holds without anyone policing it: ruff's lint and format (pyproject.toml [tool.ruff]) pass on the tree,
and the layout's one rule of dependency holds (the method never imports the shapes world)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUFF = shutil.which("ruff")


@pytest.mark.skipif(RUFF is None, reason="ruff is in the test extra: pip install -e '.[test]'")
def test_ruff_lint_passes():
    result = subprocess.run([RUFF, "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:]


@pytest.mark.skipif(RUFF is None, reason="ruff is in the test extra: pip install -e '.[test]'")
def test_ruff_format_leaves_the_tree_unchanged():
    result = subprocess.run([RUFF, "format", "--check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:]  # run `ruff format .` to fix


def test_the_method_does_not_import_the_shapes_world():
    # import p2p and every module of the method and of real images; none may pull in p2p.shapes (or the experiments)
    code = (
        "import sys, p2p, p2p.pipeline, p2p.controllers, p2p.schedules, p2p.tokens, p2p.blend, p2p.edit, "
        "p2p.views, p2p.real.images, p2p.real.inversion, p2p.real.cache, p2p.real.photo\n"
        "leaked = sorted(m for m in sys.modules if m.startswith(('p2p.shapes', 'p2p.experiments')))\n"
        "assert not leaked, leaked"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_models_never_import_the_method_or_the_config_system():
    code = (
        "import sys, models.stable_diffusion, models.loader, models.files, models.errors\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('p2p', 'hydra', 'omegaconf'))\n"
        "assert not leaked, leaked"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
