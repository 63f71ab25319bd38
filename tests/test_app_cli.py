"""scripts/app.py refuses a bad command line in one line, before loading anything."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "script, override, expected",
    [
        ("app.py", "devise=cpu", "did you mean device?"),
        ("app.py", "server_port=http", "server_port='http' is not an integer"),
    ],
)
def test_a_bad_setting_is_one_line(script, override, expected, tmp_path):
    if "port" in override:
        pytest.importorskip("gradio", reason="the app extra is not installed: pip install -e '.[app]'")
    result = run(str(REPO / "scripts" / script), override, f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], result.stderr[-2000:]
