"""The ``fastem`` console script: imports the command line inside a guard, so Ctrl-C during
start-up (torch's import takes seconds) ends with exit 130 and one line, not a traceback."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from .cli import main as command_line
    except KeyboardInterrupt:
        print("fastem: interrupted during start-up: no output was written", file=sys.stderr)
        return 130
    return command_line()


if __name__ == "__main__":
    sys.exit(main())
