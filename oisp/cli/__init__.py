"""The `oisp` command: one module per subcommand, each exposing
`register(subparsers)` which adds its parser and sets `func(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules under oisp.cli, in the order `oisp --help` lists them.
COMMANDS = ["demo", "check", "decode", "replay", "capture", "flows", "ca", "record", "redirector", "sensor", "ui",
            "service"]


def build_parser() -> argparse.ArgumentParser:
    from oisp import __version__

    parser = argparse.ArgumentParser(prog="oisp", description="See what local programs send to AI providers.")
    parser.add_argument("--version", action="version", version=f"oisp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"oisp.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from oisp.safefile import UnsafePathError

    if getattr(args, "config", None):  # a command that takes --config FILE (oisp.cli.configured)
        from oisp.cli.configured import config, with_config

        try:
            args = with_config(parser, args, argv)
        except config.ConfigError as exc:
            print(f"oisp {args.command}: {exc}", file=sys.stderr)
            return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except UnsafePathError as exc:  # a linked or foreign data directory, file or key log: what to do, no traceback
        print(f"oisp {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
