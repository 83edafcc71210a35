"""The ``layerfuse`` command: one argparse sub-command per module listed in ``COMMANDS``.

Each module ``layerfuse.cli.<name>`` exposes ``register(subparsers)``, which adds its parser and sets
``func`` (``args -> exit code``) as a default. Modules are imported when the parser is built, so a
command's optional dependencies are only needed when that command is registered and run.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from .._version import __version__

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS: tuple[str, ...] = ("demo", "similarity")

DESCRIPTION = """\
Fuse features from several layers of a vision transformer for multimodal LLMs.

examples:
  layerfuse demo            tap LLaVA's and MMFuser's layers of a ViT-L/14-336-shaped tower
  layerfuse demo --small    the same on a tiny tower (well under a second)
  layerfuse similarity --model timm:vit_base_patch16_224 --synthetic 16 --out sim.png
                            layer-similarity heat-map and shallow/middle/deep bands

Run `layerfuse <command> --help` for a command's options."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerfuse", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"layerfuse {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="<command>")
    for name in COMMANDS:
        importlib.import_module(f"{__package__}.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``layerfuse`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
