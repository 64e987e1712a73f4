"""``python -m autosyncbn demo``, ``python -m autosyncbn check`` and ``python -m autosyncbn migrate``."""
from __future__ import annotations

import argparse
import sys

from .tools import check, demo, migrate


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autosyncbn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo.add_arguments(commands.add_parser("demo", help="train on digits three ways and compare"))
    check.add_arguments(commands.add_parser("check", help="self-test on this machine's devices"))
    migrate.add_arguments(commands.add_parser(
        "migrate", help="rewrite a repository's imports of a vendored sync_batchnorm to autosyncbn"))
    args = parser.parse_args(argv)
    return {"demo": demo.main, "check": check.main, "migrate": migrate.main}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
