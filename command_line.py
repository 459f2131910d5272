"""
The bad-input convention of the project's commands (`hrwkv7`, `hrwkv7-convert`, golden/check.py):
an argument argparse refuses, a bad path, repo id, dtype or device, an output that exists, an optional
package that is not installed: one line `error: ...` on stderr and exit status 2; `--debug` shows the
traceback instead.

    def _run(argv): args = ArgumentParser(prog="mycmd").parse_args(argv); ...
    def main(argv=None): return run_command(_run, argv)
"""
import argparse
import sys


class UsageError(ValueError):
    """A command-line argument argparse refused."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, its errors raised as UsageError (reported by run_command) instead of printed with
    the usage; every command gets --debug."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if kwargs.get("add_help", True):
            self.add_argument("--debug", action="store_true", help="show the traceback of an error")

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} -h)")


# What bad input raises: a ValueError naming the bad value, a missing file or directory, an output that
# exists, an optional package that is not installed
BAD_INPUT = (ValueError, OSError, ImportError)


def run_command(main, argv=None):
    """main(argv), with bad input (BAD_INPUT) reported as one line `error: ...` on stderr (the
    message's lines joined by "; ") and exit status 2; with --debug in argv the exception propagates."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return main(argv)
    except BAD_INPUT as e:
        if "--debug" in argv:
            raise
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        print("error: " + "; ".join(lines), file=sys.stderr)
        raise SystemExit(2) from None
