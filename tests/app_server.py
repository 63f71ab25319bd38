"""A real app server for the tests: `python scripts/app.py` on a free local port, stopped after the module."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STARTUP_SECONDS = 180  # importing torch and gradio on a loaded 2-core machine
TEST_STEPS = 10  # the page's steps in the tests: enough to tell an edit from its source


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def app_server(tmp: Path) -> Iterator[str]:
    """Starts the app, yields its URL once it answers, and stops it (its log is in tmp/server.log)."""
    port = free_port()
    log = (tmp / "server.log").open("w")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False")
    process = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "scripts" / "app.py"),
            f"server_port={port}",
            f"steps={TEST_STEPS}",
            "threads=1",
            f"output_dir={tmp / 'downloads'}",
            f"cache_dir={tmp / 'inversions'}",
            f"hydra.run.dir={tmp / 'hydra'}",
        ],
        cwd=tmp,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"the app exited with {process.returncode}: {(tmp / 'server.log').read_text()[-3000:]}"
                )
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the app did not answer in {STARTUP_SECONDS} s") from None
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
