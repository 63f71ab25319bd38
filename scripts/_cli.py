"""The one wrapper around every entry point: a user's mistake is one line on stderr and exit status 2.

    @entry_point("generate")
    def main(cfg: DictConfig) -> ...

is `@hydra.main(config_path="../conf", config_name="generate")` plus error reporting:
- `models.errors.UserError` (bad input: a word not in the prompt, a size the UNet cannot take, a missing or
  pickled checkpoint, an unreadable image) prints `error: <message>` and exits with status 2;
- Hydra's own command-line errors (an unknown config group value, a misspelt override key, an override that
  does not parse) are said the same way, naming the bad value and listing the choices;
- Ctrl-C prints `error: interrupted` and exits with 130 (outputs are written to temporary names and renamed when
  complete, so nothing half-written is left behind);
- any other exception is a bug and keeps its full traceback (Hydra's shortened one and its
  "HYDRA_FULL_ERROR" hint are switched off).
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from models.errors import UserError

CONF = Path(__file__).resolve().parents[1] / "conf"
USER_ERROR_STATUS = 2  # argparse's status for a bad command line
INTERRUPTED_STATUS = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def fail(message: str, *, status: int = USER_ERROR_STATUS) -> NoReturn:
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(status)


def entry_point(config_name: str):
    """`@hydra.main` for `conf/<config_name>.yaml`, reporting user errors as one line (see the module doc)."""

    def decorate(job: Callable[[DictConfig], object]):
        started = False  # once the job runs, a Hydra/OmegaConf error is our bug, not the command line's

        @functools.wraps(job)  # Hydra names the job, and finds conf/, from the wrapped script's function
        def marked(cfg: DictConfig):
            nonlocal started
            started = True
            try:  # caught here, inside the job, so Hydra adds no "Error executing job" line of its own
                return job(cfg)
            except UserError as err:
                fail(str(err))
            except KeyboardInterrupt:
                fail("interrupted", status=INTERRUPTED_STATUS)

        hydra_main = hydra.main(config_path=str(CONF), config_name=config_name, version_base="1.3")(marked)

        @functools.wraps(job)
        def main(cfg: DictConfig | None = None):
            if cfg is not None:  # called from Python with a composed config (tests, notebooks): a plain call
                return job(cfg)
            os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing its shortened traceback
            try:
                return hydra_main()
            except (HydraException, OmegaConfBaseException) as err:
                if started:
                    raise
                fail(describe_hydra_error(err, config_name=config_name))

        return main

    return decorate


_MISSING_GROUP = re.compile(r"Could not find '(?P<group>[^']+)/(?P<value>[^']+)'")
_BAD_KEY = re.compile(r"Could not override '(?P<key>[^']+)'")


def describe_hydra_error(err: Exception, *, config_name: str) -> str:
    """Hydra's command-line errors in one line (plus the choices): the bad value, and what is accepted."""
    message = str(err)
    if match := _MISSING_GROUP.search(message):
        group, value = match["group"], match["value"]
        choices = available_choices(group)
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f" (did you mean {group}={close[0]}?)" if close else ""
        return f"{group}={value} is not a choice{hint}; available: {', '.join(choices)}"
    if match := _BAD_KEY.search(message):
        key = match["key"]
        parent, _, leaf = key.rpartition(".")
        keys = config_keys(config_name, parent)
        if keys is None:
            return f"{key}: '{parent}' is not a setting of {config_name}.yaml; check the override's spelling"
        close = difflib.get_close_matches(leaf, keys, n=1)
        hint = f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""
        where = f"'{parent}'" if parent else f"{config_name}.yaml"
        return f"{key} is not a setting of {where}{hint}; settings: {', '.join(keys)}"
    first = message.strip().splitlines()[0] if message.strip() else type(err).__name__
    return f"{first} (Hydra override syntax: key=value, group=choice, see python scripts/<script>.py --help)"


def available_choices(group: str) -> list[str]:
    """The YAML files of a config group, e.g. model → [sd14, sd15, …, tiny]."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def config_keys(config_name: str, parent: str) -> list[str] | None:
    """The keys of `parent` (dotted; "" = top level) in the composed default config, or None if no such node."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config_name)
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else None
