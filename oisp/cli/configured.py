"""`--config FILE` for the commands that take one: the file's keys become the defaults of
the command's options, so anything given on the command line wins.

A command opts in with one line in its `register()`: `add_config_option(parser)`.
`oisp.cli.main` then reads the file and parses the command line again with the file's
values as defaults (`with_config`).
"""

from __future__ import annotations

import argparse

from oisp import config


def add_config_option(parser: argparse.ArgumentParser, *, default: str | None = None) -> None:
    """Offer `--config FILE` on `parser` (a subcommand's); `default`: the file read when none is named."""
    parser.add_argument("--config", metavar="FILE", default=default,
                        help="read options from this TOML file (docs/config.md); the command line wins"
                             + (f" (default {default})" if default else ""))
    parser.set_defaults(config_parser=parser)


def with_config(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None) -> argparse.Namespace:
    """`args` parsed again with the named file's values as the command's defaults; the
    checked file rides along as `args.config_file`. Raises config.ConfigError."""
    loaded = config.read(args.config)
    command: argparse.ArgumentParser = args.config_parser
    dests = {action.dest for action in command._actions}
    scalars, lists = loaded.options(dests)
    command.set_defaults(**scalars)
    again = parser.parse_args(argv)
    for dest, values in lists.items():
        # An append option starts from its default and adds what the command line gives:
        # still the default means the command line gave none, so the file's list is taken.
        if getattr(again, dest) == command.get_default(dest):
            setattr(again, dest, list(values))
    again.config_file = loaded
    return again
