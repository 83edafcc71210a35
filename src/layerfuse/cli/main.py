"""The ``layerfuse`` command: one argparse sub-command per module listed in ``COMMANDS``.

Each module ``layerfuse.cli.<name>`` exposes ``register(subparsers)``, which adds its parser and sets
``func`` (``args -> exit code``) as a default. The command modules (and with them torch) are
imported only once a command is named: ``layerfuse --version`` and ``layerfuse --help`` are answered
from ``COMMANDS`` and ``SUMMARIES`` alone.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .._version import __version__

__all__ = ["COMMANDS", "SUMMARIES", "build_parser", "main"]

COMMANDS: tuple[str, ...] = ("demo", "similarity")

# One line per command for `layerfuse --help`, kept here so that listing them imports nothing.
SUMMARIES: dict[str, str] = {
    "demo": "run every fuser family on a random CLIP ViT-L/14-336-shaped tower",
    "similarity": "layer-by-layer representation similarity of a ViT, with band grouping and a heat-map",
}

DESCRIPTION = """\
Fuse features from several layers of a vision transformer for multimodal LLMs.

examples:
  layerfuse demo            tap LLaVA's and MMFuser's layers of a ViT-L/14-336-shaped tower
  layerfuse demo --small    the same on a tiny tower (about 10 s on a busy 2-core CPU,
                            half of it importing torch)
  layerfuse similarity --model timm:vit_base_patch16_224 --synthetic 16 --out sim.png
                            layer-similarity heat-map and shallow/middle/deep bands

Run `layerfuse <command> --help` for a command's options."""


def _top_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(
        prog="layerfuse", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"layerfuse {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="<command>")
    return parser, subparsers


def build_parser() -> argparse.ArgumentParser:
    """The full parser, every command registered (this imports the command modules and torch)."""
    parser, subparsers = _top_parser()
    for name in COMMANDS:
        importlib.import_module(f"{__package__}.{name}").register(subparsers)
    return parser


def _overview_parser() -> argparse.ArgumentParser:
    """The top-level options and the list of commands, with no command module imported."""
    parser, subparsers = _top_parser()
    for name in COMMANDS:
        # add_help=False: `layerfuse <command> --help` is left to the command's real parser
        subparsers.add_parser(name, help=SUMMARIES.get(name, ""), add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``layerfuse`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overview = _overview_parser()
    args, unknown = overview.parse_known_args(argv)  # exits here for --version and --help
    if args.command is None:
        if unknown:
            overview.error(f"unrecognized arguments: {' '.join(unknown)}")
        overview.print_help()
        return 2
    # Only the named command's module is imported (a command's dependencies stay its own).
    parser, subparsers = _top_parser()
    importlib.import_module(f"{__package__}.{args.command}").register(subparsers)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
