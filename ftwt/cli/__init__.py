"""The ``ftwt`` command line: one module per subcommand, each with ``add_parser`` and ``run``.

Any :class:`ftwt.errors.FTWTError`, and any ``OSError`` the environment raises (a file that
cannot be read or written), becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from ftwt.errors import FTWTError

# Subcommand modules under ftwt.cli, in the order ``ftwt --help`` lists them.
COMMANDS = ("flops", "estimate", "eval", "train", "sweep", "demo", "bench", "export")

# One runnable example per subcommand, shown at the end of its --help.
EXAMPLES = {
    "flops": "ftwt flops --model resnet56 --per-layer",
    "estimate": "ftwt estimate --model resnet20 --mass 0.9 --samples 64",
    "eval": "ftwt eval --checkpoint runs/train/best.pt",
    "train": "ftwt train --model resnet20 --epochs 2 --train-subset 256 --out runs/quick",
    "sweep": "ftwt sweep --model resnet20 --init runs/dense/best.pt --masses 0.8,0.9 --epochs 10 --out runs/sweep",
    "demo": "ftwt demo --out runs/demo",
    "bench": "ftwt bench --model resnet20 --mass 0.8 --samples 8",
    "export": "ftwt export --checkpoint runs/train/best.pt --format engine --out engine.safetensors",
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Module docstrings as descriptions, without their reST markup (double backticks)."""

    def _format_text(self, text: str) -> str:
        return super()._format_text(text.replace("``", ""))

    def _expand_help(self, action: argparse.Action) -> str:
        return super()._expand_help(action).replace("``", "")


def build_parser() -> argparse.ArgumentParser:
    from ftwt import __version__

    parser = argparse.ArgumentParser(
        prog="ftwt", description="Dynamic channel pruning with self-supervised mask prediction (FTWT)."
    )
    parser.add_argument("--version", action="version", version=f"ftwt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"ftwt.cli.{name}").add_parser(sub)
    for name, command in sub.choices.items():
        command.formatter_class = _HelpFormatter
        command.epilog = f"example:\n  {EXAMPLES[name]}"
    return parser


def _one_line(exc: Exception) -> str:
    """The actionable line of an error; DataLoader workers re-raise with a whole traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    last = lines[-1]
    prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
    return last.removeprefix(prefix) if len(lines) > 1 else last


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ftwt`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except FTWTError as exc:
        print(f"ftwt {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`
        return 0
    except OSError as exc:  # the file system's answer (permissions, a full disk): the user can act on it
        where = f": {exc.filename}" if exc.filename else ""
        print(f"ftwt {args.command}: error: {exc.strerror or _one_line(exc)}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ftwt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
