"""The documentation holds together: README.md (the front page) and docs/*.md.

No network: relative links must point to files of this repository (and, with a
``#anchor``, to a heading of the target page); absolute http(s) links are only
checked to be well formed. The front page stays short and keeps the set-up
commands that ``.ci/run`` runs.
"""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
MAX_README_LINES = 250

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) and ![alt](target), with an optional "title"; text may hold one level of brackets.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def outside_code_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)[0] * 3
        elif fence is not None:
            if line.lstrip().startswith(fence):
                fence = None
        else:
            lines.append((number, line))
    return lines


def prose_lines(text: str) -> list[tuple[int, str]]:
    """As :func:`outside_code_blocks`, with inline code spans blanked (a link in code is no link)."""
    return [(number, INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line))
            for number, line in outside_code_blocks(text)]


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every inline link, image and reference definition of a page."""
    found = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        found += [(number, match.group(1)) for match in INLINE_LINK.finditer(line)]
        definition = REFERENCE_DEFINITION.match(line)
        if definition:
            found.append((number, definition.group(1)))
    return found


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: its text, lowercase, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown page (outside code blocks); a repeated heading gets -1, -2, ..."""
    seen: dict[str, int] = {}
    result = set()
    for _, line in outside_code_blocks(path.read_text(encoding="utf-8")):
        heading = HEADING.match(line)
        if heading:
            anchor = github_anchor(heading.group(2))
            result.add(anchor if anchor not in seen else f"{anchor}-{seen[anchor]}")
            seen[anchor] = seen.get(anchor, 0) + 1
    return result


def link_problems(path: Path, root: Path = ROOT) -> list[str]:
    """What is wrong with the links of one page of the tree at ``root``, one line each (empty: nothing)."""
    problems = []
    for number, target in links(path):
        where = f"{path.relative_to(root).as_posix()}:{number}: {target!r}"
        if not target:
            problems.append(f"{where}: empty link")
            continue
        parts = urlsplit(target)
        if parts.scheme in ("http", "https"):
            if not parts.hostname or "." not in parts.hostname or any(c.isspace() for c in target):
                problems.append(f"{where}: malformed absolute link")
            continue
        if parts.scheme or parts.netloc:
            problems.append(f"{where}: only relative and http(s) links are allowed")
            continue
        file = path if not parts.path else (path.parent / unquote(parts.path)).resolve()
        if not file.exists():
            problems.append(f"{where}: no such file {file}")
            continue
        if root not in (file, *file.parents):
            problems.append(f"{where}: points outside the repository")
            continue
        if parts.fragment:
            if file.is_dir() or file.suffix != ".md":
                problems.append(f"{where}: an anchor into a file that is not a markdown page")
            elif unquote(parts.fragment) not in anchors(file):
                problems.append(f"{where}: no heading #{parts.fragment} in {file.relative_to(root).as_posix()}")
    return problems


def test_there_are_docs_pages():
    assert DOCS, "docs/*.md: no pages found"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_links_point_to_existing_files_and_headings(page: Path):
    assert links(page) or page != README, "README.md has no links at all: the link parser is broken"
    problems = link_problems(page)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", DOCS, ids=_rel)
def test_every_docs_page_is_linked_from_the_readme(page: Path):
    targets = {(README.parent / urlsplit(target).path).resolve() for _, target in links(README)}
    assert page.resolve() in targets, f"README.md does not link to {_rel(page)}"


def test_readme_is_a_front_page_of_at_most_250_lines():
    count = len(README.read_text(encoding="utf-8").splitlines())
    assert count <= MAX_README_LINES, f"README.md has {count} lines; at most {MAX_README_LINES}"


def ci_setup_command() -> str:
    """The line of .ci/run after its '# README, "Set-up", second command:' comment."""
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    marker = '# README, "Set-up", second command:'
    index = next((i for i, line in enumerate(lines) if line.strip() == marker), None)
    assert index is not None and index + 1 < len(lines), f".ci/run has no line after {marker!r}"
    command = lines[index + 1].strip()
    assert command.startswith("pip install"), f".ci/run: the line after {marker!r} is {command!r}"
    return command


def test_readme_has_the_setup_commands_ci_runs():
    readme = README.read_text(encoding="utf-8")
    command = ci_setup_command()
    assert command in readme, f"README.md lacks .ci/run's set-up command verbatim: {command!r}"
    assert "python -m pytest" in readme, "README.md lacks the test command `python -m pytest`"
    setup = readme.split("## Set-up", 1)
    assert len(setup) == 2, "README.md has no '## Set-up' section"
    section = setup[1].split("\n## ", 1)[0]
    assert command in section, "the set-up command must be in the README's 'Set-up' section"


def test_embedded_ci_example_matches_its_file():
    """Every page that shows examples/ci/test_model_on_cpu_replicas.py shows it as it is."""
    example = (ROOT / "examples" / "ci" / "test_model_on_cpu_replicas.py").read_text(encoding="utf-8")
    body = example.split('"""', 2)[2].strip()
    page = ROOT / "docs" / "testing-on-cpu.md"
    assert body in page.read_text(encoding="utf-8"), f"{_rel(page)} and the example file differ"


# The checker itself: each kind of broken link is caught.

@pytest.mark.parametrize("heading, anchor", [
    ("Options of `install()` / `patched()`", "options-of-install--patched"),
    ('What "correct" means (the guarantees)', "what-correct-means-the-guarantees"),
    ("Coming from sync_batchnorm", "coming-from-sync_batchnorm"),
    ("Beyond one machine: torch.distributed (gloo on CPU, NCCL on GPU)",
     "beyond-one-machine-torchdistributed-gloo-on-cpu-nccl-on-gpu"),
    ("Users' code", "users-code"),
    ("The self-test: `check`", "the-self-test-check"),
])
def test_github_anchor_rule(heading: str, anchor: str):
    assert github_anchor(heading) == anchor


@pytest.mark.parametrize("text, expected", [
    ("[ok](README.md)", []),
    ("[ok](docs/guide.md#api)", []),
    ("![img](docs/demo_curves.png)", []),
    ("[ok](#a-heading)", []),
    ("[ok](https://pytorch.org/get-started/)", []),
    ("`[not a link](nowhere.md)` in code", []),
    ("```\n[not a link](nowhere.md)\n```", []),
    ("[ref]: docs/guide.md", []),
    ("[missing](docs/nowhere.md)", ["no such file"]),
    ("![missing](docs/nowhere.png)", ["no such file"]),
    ("[bad anchor](docs/guide.md#no-such-heading)", ["no heading"]),
    ("[bad anchor here](#no-such-heading)", ["no heading"]),
    ("[anchor into code](setup.cfg#x)", ["not a markdown page"]),
    ("[malformed](https://)", ["malformed"]),
    ("[malformed](https:/pytorch.org)", ["malformed"]),
    ("[no host](http://localhost:8000/)", ["malformed"]),
    ("[ftp](ftp://example.com/x)", ["only relative"]),
    ("[ref]: docs/nowhere.md", ["no such file"]),
])
def test_the_checker_catches_broken_links(tmp_path: Path, text: str, expected: list):
    """A page in a small tree of its own: README.md, docs/guide.md (with '## API'), an image, a non-markdown file."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text("# Guide\n\n## API\n", encoding="utf-8")
    (tmp_path / "docs" / "demo_curves.png").write_bytes(b"\x89PNG")
    (tmp_path / "setup.cfg").write_text("[metadata]\n", encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text(f"# A heading\n\n{text}\n", encoding="utf-8")
    problems = link_problems(page, root=tmp_path.resolve())
    assert len(problems) == len(expected), problems
    for problem, words in zip(problems, expected):
        assert words in problem, problem


def test_anchors_skip_code_blocks_and_number_repeated_headings(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Notes\n\n```bash\n# a comment, not a heading\n```\n\n## Notes\n", encoding="utf-8")
    assert anchors(page) == {"title", "notes", "notes-1"}
