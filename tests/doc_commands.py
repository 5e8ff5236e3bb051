"""The pages a reader sees, as data: the fenced shell blocks of README.md and docs/*.md with the
``doc-test`` comment that says how each runs, their relative links, and GitHub's heading anchors.

A shell block (```bash, ```sh, ```shell, ```console) runs as written unless an HTML comment on the
line before its fence says otherwise (docs/architecture.md, "Tests", is the reader's version)::

    <!-- doc-test: DATA=tiny; add fit.py: --trainer.fast_dev_run=true -->
    <!-- doc-test: skip: hours of training on a CPU -->

Directives, separated by ``;``:

- ``TEXT=RESOURCE``: replace TEXT (a whole word or path) in the commands with a resource the test
  makes (``RESOURCES``);
- ``add SCRIPT: ARGS``: append ARGS to each command of that script (``fit.py``; ``cifar_lightning``
  for ``python -m cifar_lightning``; ``*`` for every Python command), before the replacements;
- ``exit: N``: the block's Python commands must exit with N (default 0); other commands must succeed;
- ``slow``: run under ``-m slow`` only, each command in its own process;
- ``requires: PATH`` or ``requires: weights NAME``: skip, saying why, until that file or network's
  shipped weights exist;
- ``skip: REASON``: never run; REASON must be visible to the reader, in the block or just above it.

In a ``console`` block a command starts with ``$ ``; the lines after it are output, and each must
appear in the command's output, ``...`` matching anything.
"""

from __future__ import annotations

import re
import shlex
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: The pages whose commands and links are checked.
PAGES = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))

SHELL_LANGUAGES = ("bash", "sh", "shell", "console")

#: What ``TEXT=RESOURCE`` may name; ``test_docs.Resources`` makes each.
RESOURCES = ("tiny", "cifar10", "archive", "image", "images", "run", "checkpoint")

_MARKER = re.compile(r"^\s*<!--\s*doc-test:(?P<body>.*?)-->\s*$")
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)\s*$")
#: Lines above a marker that count as "just above it" for a skip's visible reason.
_CONTEXT_LINES = 6


@dataclass
class Directives:
    """What a block's ``doc-test`` comment says (see the module docstring)."""

    skip: str | None = None
    slow: bool = False
    exit: int = 0
    requires: list[str] = field(default_factory=list)
    subs: dict[str, str] = field(default_factory=dict)
    add: list[tuple[str, list[str]]] = field(default_factory=list)


@dataclass
class Command:
    """One command line of a block, and in a console block the output shown after it."""

    line: str
    expected: list[str] = field(default_factory=list)


@dataclass
class Block:
    """A fenced shell block of a page."""

    page: Path
    line: int  # of the opening fence, from 1
    lang: str
    text: str
    directives: Directives
    above: str  # the visible lines just above the block (and its marker)

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    def commands(self) -> list[Command]:
        return console_commands(self.text) if self.lang == "console" else shell_commands(self.text)


def parse_directives(body: str) -> Directives:
    """``Directives`` of a ``doc-test`` comment's body; ``ValueError`` for anything unknown."""
    d = Directives()
    for part in (p.strip() for p in body.split(";")):
        if not part:
            continue
        if part == "slow":
            d.slow = True
        elif part.startswith("skip:"):
            d.skip = part[len("skip:") :].strip()
            if not d.skip:
                raise ValueError("skip: needs a reason")
        elif part.startswith("exit:"):
            d.exit = int(part[len("exit:") :])
        elif part.startswith("requires:"):
            d.requires.append(part[len("requires:") :].strip())
        elif part.startswith("add ") and ":" in part:
            script, _, args = part[len("add ") :].partition(":")
            d.add.append((script.strip(), shlex.split(args)))
        elif "=" in part:
            text, _, resource = (s.strip() for s in part.partition("="))
            if resource not in RESOURCES:
                raise ValueError(f"unknown resource {resource!r} in {part!r}; known: {', '.join(RESOURCES)}")
            d.subs[text] = resource
        else:
            raise ValueError(f"unknown doc-test directive {part!r}")
    return d


def page_blocks(page: Path) -> list[Block]:
    """Every fenced shell block of ``page``, with its directives (``ValueError`` on a bad comment)."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group("fence"), m.group("lang").lower(), i
        indent = len(m.group("indent"))
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][indent:] if not indent or lines[i][:indent].isspace() else lines[i].lstrip())
            i += 1
        i += 1  # the closing fence
        if lang not in SHELL_LANGUAGES:
            continue
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        marker = _MARKER.match(lines[j]) if j >= 0 else None
        try:
            directives = parse_directives(marker.group("body")) if marker else Directives()
        except ValueError as err:
            raise ValueError(f"{page.relative_to(REPO)}:{j + 1}: {err}") from None
        first = j if marker else start
        above = [ln for ln in lines[max(0, first - _CONTEXT_LINES) : first] if not _FENCE.match(ln)]
        blocks.append(Block(page, start + 1, lang, "\n".join(body), directives, " ".join(" ".join(above).split())))
    return blocks


def _joined(text: str) -> list[str]:
    """Lines with their backslash continuations joined."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    if pending:
        out.append(pending)
    return out


def shell_commands(text: str) -> list[Command]:
    """The commands of a bash block: every line that is not blank or a comment."""
    return [Command(line.strip()) for line in _joined(text) if line.strip() and not line.lstrip().startswith("#")]


def console_commands(text: str) -> list[Command]:
    """The ``$ `` commands of a console block, each with the output lines shown after it."""
    commands: list[Command] = []
    for line in _joined(text):
        if line.startswith("$ "):
            commands.append(Command(line[2:].strip()))
        elif line.strip() and commands:
            commands[-1].expected.append(line.strip())
    return commands


def substitute(line: str, subs: dict[str, str]) -> str:
    """``line`` with each TEXT of ``subs`` (a whole word or path, longest first) replaced by its value."""
    for text in sorted(subs, key=len, reverse=True):
        line = re.sub(r"(?<![\w.$/-])" + re.escape(text) + r"(?![\w-])", lambda _, v=subs[text]: v, line)
    return line


def output_shows(output: str, expected: str) -> bool:
    """Whether one line of ``output`` holds ``expected``, where ``...`` matches anything."""
    pattern = ".*".join(re.escape(part) for part in expected.split("..."))
    return any(re.search(pattern, line) for line in output.splitlines())


# ---------------------------------------------------------------------------------------------
# Links
# ---------------------------------------------------------------------------------------------


_LINK = re.compile(r"(?<!\!)\[(?:[^\]\[]|\[[^\]]*\])*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
_IMAGE = re.compile(r"!\[[^\]]*\]\((?P<target>[^)\s]+)\)")
_CODE_SPAN = re.compile(r"`+[^`]*`+")


def _prose_lines(text: str, code: bool = False) -> list[tuple[int, str]]:
    """(line number, line) of ``text`` outside fenced blocks, inline code removed unless ``code``."""
    out, fence = [], None
    for n, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if m and (fence is None or line.strip().startswith(fence)):
            fence = None if fence else m.group("fence")
            continue
        if fence is None:
            out.append((n, line if code else _CODE_SPAN.sub("", line)))
    return out


def relative_links(page: Path) -> list[tuple[int, str]]:
    """(line, target) of every link and image of ``page`` that is not a URL."""
    links = []
    for n, line in _prose_lines(page.read_text()):
        for pattern in (_LINK, _IMAGE):
            for m in pattern.finditer(line):
                target = m.group("target")
                if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
                    links.append((n, target))
    return links


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = _CODE_SPAN.sub(lambda m: m.group(0).strip("`"), heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The heading anchors of ``page``, with GitHub's -1, -2 ... for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose_lines(page.read_text(), code=True):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = github_slug(m.group(1))
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out
