"""The ``alexnet`` command: every stage of the pipeline from a terminal.

Each command parses its options and calls exactly one library function, the same one the Prefect flow's task
and the tests call. Run ``alexnet COMMAND --help`` for the options of a command.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from alexnet.cli import data, model
from alexnet.cli.model import add_train_arguments, add_transfer_arguments, config_from_args, train_main
from alexnet.cli.options import Handler

__all__ = ["add_train_arguments", "add_transfer_arguments", "build_parser", "config_from_args", "main", "train_main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alexnet",
        description="Reproduce AlexNet (Krizhevsky, Sutskever & Hinton, NIPS 2012): download, prepare, stats, ...",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data.add_commands(commands)
    model.add_commands(commands)
    data.add_synth_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from pipelines.redact import redact_handlers, redact_text

    redact_handlers()  # no credential of a URI in a log line, ours or a library's
    handler: Handler = args.handler
    try:
        return handler(args) or 0
    except (ValueError, RuntimeError, FileNotFoundError, OSError) as e:
        # Expected failures (bad input, checksum, incomplete data) end with their message, not a traceback.
        logging.getLogger("alexnet").debug("failed", exc_info=True)
        print(f"alexnet {args.command}: error: {redact_text(str(e))}", file=sys.stderr)
        return 2
