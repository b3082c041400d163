"""The README and docs/ hold to the code.

- The README stays short (≤ 20,000 bytes) and opens with the two commands `.ci/run` and a new user rely on.
- The parts of docs/ generated from the code (tests/docs_reference.py) are current.
- Every `bns …` command in a ```sh block of README.md and docs/*.md parses with the real argument parser
  (resolver.cli.build_parser; parsed, not run), in the grammar of today rather than an old spelling. The rule:
  only ```sh blocks are parsed, each command as it stands, placeholders (`…`, `ID`) being words like any
  other; a synopsis (a ``` block with no language, where `[--flag]` and `a | b` are notation) and commands
  quoted in the text are not parsed, but the command words they name (`bns site token …`) must exist.
- The ```sh runnable blocks of a file run as they stand, in order, in one empty directory, with the
  installed `bns` on PATH and no BNS_ variable: they must need no network beyond loopback and no Redis.
- Every relative link of those files reaches a file, and a `#fragment` a heading of it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from resolver.cli import build_parser, spelled_before
from tests.docs_reference import ROOT, generated_files, remade

README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 20_000
INSTALL_AND_RUN = "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/bns serve"
INSTALL_AND_TEST = "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest"
_FENCE = re.compile(r"^```(.*)$")
_SEPARATORS = {";", "&&", "||", "|", "&"}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of its first line of content, 1-based
    info: str  # what follows the opening ``` ("sh", "sh runnable", "")
    text: str

    @property
    def language(self) -> str:
        return self.info.split()[0] if self.info.split() else ""

    @property
    def runnable(self) -> bool:
        return self.language == "sh" and "runnable" in self.info.split()[1:]


def blocks_of(path: Path) -> list[Block]:
    found: list[Block] = []
    lines = path.read_text().split("\n")
    opened: tuple[int, str] | None = None
    for number, line in enumerate(lines, 1):
        fence = _FENCE.match(line.strip())
        if fence is None:
            continue
        if opened is None:
            opened = (number, fence.group(1).strip())
        else:
            start, info = opened
            found.append(Block(path, start + 1, info, "\n".join(lines[start : number - 1])))
            opened = None
    return found


def _without_comment(text: str) -> tuple[str, bool]:
    """`text` up to a shell comment (a `#` starting a word outside quotes), and whether its quotes close."""
    quote = ""
    index = 0
    while index < len(text):
        char = text[index]
        if quote:
            if char == quote:
                quote = ""
            elif char == "\\" and quote == '"':
                index += 1
        elif char in "'\"":
            quote = char
        elif char == "\\":
            index += 1
        elif char == "#" and (index == 0 or text[index - 1].isspace()):
            return text[:index], True
        index += 1
    return text, not quote


def commands_of(block: Block) -> Iterator[tuple[int, list[str]]]:
    """(line, argv after `bns`) of every bns command of a shell block: lines continued by `\\` or by an open
    quote are joined, comments and heredoc bodies skipped, `;` `&&` `||` `|` split commands."""
    pending, first = "", 0
    heredoc: str | None = None
    for offset, line in enumerate(block.text.split("\n")):
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        text, closed = _without_comment(pending + line)
        first = first if pending else block.line + offset
        if not closed:
            pending = pending + line + "\n"
            continue
        if text.rstrip().endswith("\\"):
            pending = text.rstrip()[:-1] + " "
            continue
        pending = ""
        tag = re.search(r"<<-?\s*['\"]?(\w+)", text)
        heredoc = tag.group(1) if tag else None
        lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        command: list[str] = []
        for token in [*lexer, ";"]:
            if token not in _SEPARATORS:
                command.append(token)
                continue
            while command and re.match(r"\w+=", command[0]):  # VAR=value before a command
                command.pop(0)
            if command[:1] == ["bns"]:
                yield first, command[1:]
            command = []


def parse_error(argv: list[str]) -> str | None:
    """Why the grammar refuses `bns ARGV`, or None when it parses it (without running it)."""
    parser = build_parser()
    old = spelled_before(argv, parser)
    if old is not None:
        return old
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(argv)
    except SystemExit:
        return stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue().strip() else "refused"
    return None


def shell_commands() -> list[tuple[str, list[str]]]:
    return [
        (f"{block.path.relative_to(ROOT)}:{line}", argv)
        for path in DOCUMENTS
        for block in blocks_of(path)
        if block.language == "sh"
        for line, argv in commands_of(block)
    ]


def named_commands() -> list[tuple[str, list[str]]]:
    """The `bns …` of the text and of synopses (``` blocks with no language): where, and its words."""
    found = []
    for path in DOCUMENTS:
        text = path.read_text()
        for block in blocks_of(path):
            if block.language == "":
                for offset, line in enumerate(block.text.split("\n")):
                    if line.startswith("bns "):
                        found.append((f"{path.relative_to(ROOT)}:{block.line + offset}", line.split()[1:]))
        for span in re.finditer(r"(?<!`)`(bns [^`]+)`", text):
            line = text.count("\n", 0, span.start()) + 1
            found.append((f"{path.relative_to(ROOT)}:{line}", span.group(1).split()[1:]))
    return found


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = (action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return next((action.choices for action in actions), {})


def unknown_command(words: list[str]) -> str | None:
    """The first word naming a command the grammar lacks, walking it while it has commands to choose from and
    the words name commands: a placeholder (`SITE`, `[…]`, `--flag`) ends the walk, and each of `a|b` must
    exist. An old spelling the grammar still takes (saying what replaced it) counts as known."""
    parser = build_parser()
    if spelled_before(words, parser) is not None:
        return None
    for word in words:
        choices = _subcommands(parser)
        if not choices or not re.fullmatch(r"[a-z][a-z-]*(\|[a-z][a-z-]*)*", word):
            return None
        missing = [choice for choice in word.split("|") if choice not in choices]
        if missing:
            return missing[0]
        if "|" in word:
            return None
        parser = choices[word]
    return None


@pytest.mark.unit
def test_the_readme_is_short_and_opens_with_the_two_commands():
    assert len(README.read_bytes()) <= README_LIMIT, f"README.md: {len(README.read_bytes())} bytes"
    first_two = [block.text.strip() for block in blocks_of(README)[:2]]
    assert first_two == [INSTALL_AND_RUN, INSTALL_AND_TEST]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]'" in ci  # the same install, quieter
    assert ".venv/bin/python -m pytest" in ci


@pytest.mark.unit
@pytest.mark.parametrize("path", generated_files())
def test_the_generated_docs_are_current(path):
    assert (ROOT / path).read_text() == remade(path), f"{path} is stale: run python -m tests.docs_reference"


@pytest.mark.unit
def test_a_stale_generated_part_is_noticed():
    current = (ROOT / "docs" / "configuration.md").read_text()
    stale = current.replace("| `log.level` |", "| `log.levels` |")
    assert stale != current
    assert remade("docs/configuration.md", stale) == current


@pytest.mark.unit
def test_every_shell_command_parses():
    commands = shell_commands()
    assert len(commands) > 40  # the tours and every file's examples, not a parser that found nothing
    refused = [f"{where}: bns {shlex.join(argv)}: {why}" for where, argv in commands if (why := parse_error(argv))]
    assert refused == []


@pytest.mark.unit
def test_every_command_named_in_the_text_exists():
    named = named_commands()
    assert len(named) > 40
    unknown = [
        f"{where}: bns {' '.join(words)}: {word!r}" for where, words in named if (word := unknown_command(words))
    ]
    assert unknown == []


@pytest.mark.unit
@pytest.mark.parametrize(
    ("argv", "refused"),
    [
        (["device", "pause", "home", "tablet", "--for", "30m"], False),
        (["why", "x.example", "--address", "192.0.2.1", "--cnames", "a.example", "b.example"], False),
        (["why", "x.example", "--address", "192.0.2.1", "--cnamez", "a.example"], True),  # no such flag
        (["device", "pause", "home"], True),  # a missing argument
        (["pause", "home", "--device", "tablet"], True),  # an old spelling
        (["frobnicate"], True),
    ],
)
def test_the_parse_check_refuses_what_the_parser_refuses(argv, refused):
    assert (parse_error(argv) is not None) == refused


@pytest.mark.unit
def test_commands_are_found_as_a_shell_would_split_them():
    block = Block(
        Path("x.md"),
        1,
        "sh",
        "export A=1 B=2\n"
        "bns site show home --json      # a comment's apostrophe: it's ignored\n"
        'bns group set home kids; bns policy set home --group kids --policy \'{"block":\n'
        '  ["pornography"]}\'\n'
        "cat > f <<'EOF'\nbns not a command\nEOF\n"
        "bns lists compile --out x.bns \\\n    --source-dir c/ && BNS_TOKEN=t bns lists push x.bns | head",
    )
    assert list(commands_of(block)) == [
        (2, ["site", "show", "home", "--json"]),
        (3, ["group", "set", "home", "kids"]),
        (3, ["policy", "set", "home", "--group", "kids", "--policy", '{"block":\n  ["pornography"]}']),
        (8, ["lists", "compile", "--out", "x.bns", "--source-dir", "c/"]),
        (8, ["lists", "push", "x.bns"]),
    ]


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors_of(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.DOTALL | re.MULTILINE)
    anchors: set[str] = set()
    for heading in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE):
        slug, count = _slug(heading), 0
        while (slug if count == 0 else f"{slug}-{count}") in anchors:
            count += 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def broken_links(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.DOTALL | re.MULTILINE)
    text = re.sub(r"`[^`\n]*`", "", text)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:: not followed here
        file, _, fragment = target.partition("#")
        reached = (path.parent / file).resolve() if file else path
        if not reached.exists():
            broken.append(f"{target}: no such file")
        elif fragment and reached.suffix == ".md" and fragment not in anchors_of(reached):
            broken.append(f"{target}: no heading #{fragment}")
    return broken


@pytest.mark.unit
@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_link_reaches_its_file_and_heading(path):
    assert broken_links(path) == []


@pytest.mark.unit
def test_the_link_check_finds_a_broken_link(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## Who is asking\n")
    page = tmp_path / "b.md"
    page.write_text(
        "[ok](a.md#who-is-asking) [ok](a.md) [gone](c.md) [no](a.md#who) `[not](a link)`\n"
        "```sh\necho [not](a-link)\n```\n[web](https://example.com)\n"
    )
    assert broken_links(page) == ["c.md: no such file", "a.md#who: no heading #who"]


@pytest.mark.unit
def test_the_index_lists_every_document():
    index = (ROOT / "docs" / "README.md").read_text()
    readme = README.read_text()
    for path in DOCUMENTS[1:]:
        if path.name != "README.md":
            assert f"({path.name}" in index, f"docs/README.md does not link {path.name}"
            assert f"(docs/{path.name}" in readme, f"README.md does not link docs/{path.name}"


def runnable_files() -> list[Path]:
    return [path for path in DOCUMENTS if any(block.runnable for block in blocks_of(path))]


@pytest.mark.e2e
@pytest.mark.parametrize("path", runnable_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_the_runnable_blocks_run(path, tmp_path):
    script = "\n".join(block.text for block in blocks_of(path) if block.runnable)
    scripts = Path(sys.executable).parent
    assert (scripts / "bns").exists(), f"no bns beside {sys.executable}: install the package (pip install -e .)"
    environment = {name: value for name, value in os.environ.items() if not name.startswith("BNS_")}
    if "BNS_PURE_PYTHON" in os.environ:
        environment["BNS_PURE_PYTHON"] = os.environ["BNS_PURE_PYTHON"]
    environment.update(PATH=f"{scripts}{os.pathsep}{os.environ['PATH']}", HOME=str(tmp_path), TMPDIR=str(tmp_path))
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, f"{path.name}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"


@pytest.mark.unit
def test_the_readme_has_runnable_blocks():
    assert README in runnable_files()


def test_the_alert_rules_in_operations_are_valid_prometheus_rules(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    text = (ROOT / "docs" / "operations.md").read_text()
    (rules,) = re.findall(r"```yaml\n(groups:.*?)```", text, re.DOTALL)
    (tmp_path / "rules.yml").write_text(rules)
    checked = subprocess.run([promtool, "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 3 rules found" in checked.stdout
