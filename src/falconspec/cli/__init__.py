"""``falconspec`` command line: thin wrappers over the library. Each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# subcommand modules, each with ``register(subparsers)`` that adds a parser whose default ``func`` runs it
COMMANDS = ("generate", "calibrate", "gen_data", "train", "train_eagle3", "serve", "bench", "export")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = argparse.ArgumentParser(prog="falconspec", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, RuntimeError, OSError) as err:
        print(f"falconspec {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
