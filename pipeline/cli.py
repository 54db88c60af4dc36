"""What every stage entry point shares: overrides in, params validated, errors out as one line."""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

from pipeline import tracking
from pipeline.config import Params, load_params, repo_root
from pipeline.errors import PipelineError
from pipeline.runtime import setup_logging

log = logging.getLogger(__name__)
STAGES = Path(__file__).resolve().parents[1] / "stages"


def load_stage(name: str) -> ModuleType:
    """A stage script (stages/<name>.py) as a module, for in-process calls of its ``run`` (tests, benchmarks:
    one process for many stages instead of seconds of imports per stage)."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", STAGES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(run: Callable[[Params], None], argv: Sequence[str] | None = None) -> None:
    """``python stages/<stage>.py key=value ...``: load params with the overrides and call ``run``."""
    setup_logging()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        tracking.check_server(tracking.tracking_uri(repo_root()))  # before any compute, not at the first log call
        run(load_params(args))
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def main_block(run: Callable[..., object], argv: Sequence[str] | None = None) -> None:
    """``python stages/<stage>.py block=bN key=value ...`` for per-block stages: ``run(params, block=bN)``."""
    args = list(sys.argv[1:] if argv is None else argv)
    blocks = [a.split("=", 1)[1] for a in args if a.startswith("block=")]
    if len(blocks) != 1:
        setup_logging()
        print("error: name exactly one block: python stages/<stage>.py block=b0 [key=value ...]", file=sys.stderr)
        sys.exit(2)
    main(lambda params: run(params, block=blocks[0]), [a for a in args if not a.startswith("block=")])
