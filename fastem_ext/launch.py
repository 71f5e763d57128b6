"""The ``fastem`` console script: imports the command line inside a guard, so Ctrl-C during
start-up (torch's import takes seconds) ends with exit 130 and one line, not a traceback; and
leaves without the interpreter's teardown, where a late Ctrl-C would print one too."""

from __future__ import annotations

import os
import signal
import sys


def main() -> int:
    """Run the command line and end the process (``os._exit``: every output has been committed
    and closed by then; only stdout and stderr need flushing). For the console script only.

    Ctrl-C during the imports is remembered as well as raised: an imported module that catches
    everything (a bare ``except:`` around an optional import) could swallow the
    KeyboardInterrupt, and the run would go on as if no Ctrl-C had come."""
    interrupted = False

    def on_interrupt(signum, frame) -> None:
        nonlocal interrupted
        interrupted = True
        raise KeyboardInterrupt

    # Only where Ctrl-C would interrupt anyway (not in a job started with SIGINT ignored).
    guard = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if guard:
        signal.signal(signal.SIGINT, on_interrupt)
    try:
        try:
            from .cli import main as command_line
        finally:
            if guard:  # runs a signal still pending, so inside the outer try
                signal.signal(signal.SIGINT, signal.default_int_handler)
    except KeyboardInterrupt:
        interrupted = True
    except BaseException:
        if not interrupted:  # an import broken by its swallowed interrupt ends as one
            raise
    if interrupted:
        print("fastem: interrupted during start-up: no output was written", file=sys.stderr)
        return 130
    code = command_line()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
