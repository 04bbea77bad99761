"""The `ran` command: `ran summary` here; training subcommands come from LightningCLI."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "summary":
        from ran.summary import summary_main
        return summary_main(argv[1:])
    print("usage: ran summary MODEL | ran summary --all [--markdown]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
