"""The `magtune` command. Each module in this package registers its own sub-commands.

Heavy imports (torch, the api) happen inside the command functions, so `magtune --help` is instant and
`magtune serve` never loads torch.
"""

import argparse
import sys
from collections.abc import Sequence

from worker.cli import key_commands, ml_commands, service_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="magtune",
        description="Fine-tune MagFace face-embedding models on same/different feedback.",
        epilog="Every command but the long-running up, serve and worker takes --json: one JSON document on "
        "stdout.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    service_commands.register(commands)
    key_commands.register(commands)
    ml_commands.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
