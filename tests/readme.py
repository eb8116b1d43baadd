"""The README's shell blocks, read the way the tests that run them need them.

A test that runs README commands gets them from `commands(HEADING)` or `console_steps(HEADING)`,
naming the heading the block sits under, and runs every line it gets. tests/test_readme.py's guard
reads those calls in every test file: a command under a heading no test names fails the suite,
naming the line.
"""

import re
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
SHELL_LANGS = ("sh", "console")
HEADING = re.compile(r"^(#{1,6}) (.+)$")


@dataclass(frozen=True)
class Block:
    headings: tuple[str, ...]  # the headings it sits under, outermost first
    lang: str
    text: str
    line_no: int  # where its first line is in README.md


def blocks() -> list[Block]:
    """Return every shell block of the README (```sh and ```console)."""
    found, path, fence = [], [], None
    lines = README.read_text().splitlines()
    for no, line in enumerate(lines, 1):
        if fence is not None:
            if line.startswith("```"):
                lang, start, body = fence
                if lang in SHELL_LANGS:
                    found.append(Block(tuple(h for _, h in path), lang, "\n".join(body), start))
                fence = None
            else:
                fence[2].append(line)
        elif line.startswith("```"):
            fence = (line[3:].strip(), no + 1, [])
        elif m := HEADING.match(line):
            level = len(m[1])
            path = [(lv, h) for lv, h in path if lv < level] + [(level, m[2])]
    return found


def numbered_commands(block: Block) -> list[tuple[int, str]]:
    """Return a block's command lines with their line numbers in README.md: the `$ ` lines of a console
    block; every line of a sh block that is not blank or a comment, `\\` continuations joined as the
    shell joins them."""
    out: list[tuple[int, str]] = []
    for no, line in enumerate(block.text.splitlines(), block.line_no):
        if block.lang == "console":
            if line.startswith("$ "):
                out.append((no, line[2:]))
        elif out and out[-1][1].endswith("\\"):
            out[-1] = (out[-1][0], out[-1][1] + "\n" + line)
        elif line.strip() and not line.lstrip().startswith("#"):
            out.append((no, line))
    return out


def block_commands(block: Block) -> list[str]:
    return [command for _, command in numbered_commands(block)]


def under(heading: str) -> list[Block]:
    """Return the shell blocks under a heading (its subsections included); fail if it has none."""
    found = [b for b in blocks() if heading in b.headings]
    assert found, f"README.md has no shell block under a heading {heading!r}"
    return found


def commands(heading: str) -> list[str]:
    """Return every command line of the shell blocks under a heading, in order."""
    return [c for b in under(heading) for c in block_commands(b)]


def console_steps(heading: str) -> list[list[tuple[str, list[str]]]]:
    """Return the console blocks under a heading: per block, (command, lines it must print) in order."""
    out = []
    for block in under(heading):
        assert block.lang == "console", f"README.md line {block.line_no}: a ```{block.lang} block under {heading!r}"
        steps: list[tuple[str, list[str]]] = []
        for line in block.text.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            elif steps and line.strip():
                steps[-1][1].append(line)
        out.append(steps)
    return out
