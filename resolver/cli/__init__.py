"""The `bns` command line: serve a node (server.py), compile and publish lists (lists.py), and change sites,
devices, policies and pauses (sites.py), each command a noun then a verb. Every failure is reported here,
once: its message on stderr and its exit code (0 done, 1 failed, 2 refused, 3 not found, 4 not allowed, 5 a
write whose outcome is unknown; see resolver.shared.errors). A reader that stops reading (`bns config | head
-1`) ends the command quietly, with 141 as a command killed by SIGPIPE would.

The spellings before the noun-verb grammar (each module's `REPLACED`) still work for one release, each saying
on stderr what replaced it."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from blocklists.errors import BlocklistError
from resolver import __version__
from resolver.cli import lists, server, sites
from resolver.shared.errors import EXIT_FAILURE, BnsError, exit_code_of

# An old spelling's first words → what replaced them.
REPLACED: dict[tuple[str, ...], str] = {**sites.REPLACED, **lists.REPLACED}
EXIT_CLOSED_PIPE = 128 + signal.SIGPIPE


def build_parser(replaced: bool = False) -> argparse.ArgumentParser:
    """The grammar, or (`replaced`) the old spellings only."""
    parser = argparse.ArgumentParser(prog="bns", description="A filtering, caching DNS resolver.")
    parser.add_argument("--version", action="version", version=f"bns {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if replaced:
        for module in (lists, sites):
            module.add_replaced_commands(commands)
    else:
        for module in (server, lists, sites):
            module.add_commands(commands)
    return parser


def spelled_before(argv: Sequence[str], parser: argparse.ArgumentParser) -> str | None:
    """If `argv` is spelled the old way, what to say: its first words are an old spelling's, and the grammar
    does not take the word after them (`bns policy home …` is old, `bns policy set home …` is not)."""
    for words, new in REPLACED.items():
        if tuple(argv[: len(words)]) == words:
            taken = _verbs(parser, words)
            if not taken or (len(argv) > len(words) and argv[len(words)] not in {*taken, "-h", "--help"}):
                return f"bns {' '.join(words)} is now {new}; this spelling goes in the next release"
    return None


def _verbs(parser: argparse.ArgumentParser, words: Sequence[str]) -> set[str]:
    """The words the grammar takes after `words` (none when it does not take `words` at all)."""
    for word in words:
        choices = _commands(parser)
        if word not in choices:
            return set()
        parser = choices[word]
    return set(_commands(parser))


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The commands a parser takes after its own words, by name."""
    found = (action.choices for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return next(found, {})


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    note = spelled_before(words, parser)
    if note is not None:
        print(f"bns: {note}", file=sys.stderr)
        parser = build_parser(replaced=True)
    try:
        args = parser.parse_args(words)
        code = int(args.run(args))
        sys.stdout.flush()  # here, where a reader gone is caught, rather than at exit
        return code
    except (BnsError, BlocklistError) as exc:
        print(f"bns: {exc.explain() if isinstance(exc, BnsError) else exc}", file=sys.stderr)
        return exit_code_of(exc)
    except BrokenPipeError:
        # Nothing more can reach the reader; what is still buffered must not fail again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_CLOSED_PIPE
    except OSError as exc:  # a file or socket the machine refused; not this program's fault, nor a traceback's
        print(f"bns: {exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
