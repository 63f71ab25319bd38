"""Issue 29: the README shows the repository as it is, and the docs' links lead somewhere.

- The README opens with its two commands, `make demo` and `make test`, and the Makefile has both targets.
- The file tree in the README's "Layout" section matches the repository: every path it lists exists, and every
  package folder and module under models/, p2p/ (subpackages included) and scripts/ is listed. Not required:
  `__init__.py` files and private helpers named `_*.py` (scripts/_cli.py, scripts/_common.py), which a newcomer
  does not open first; they may still be listed.
- Every relative link (and image) in the README, docs/*.md, the model card and notebooks/README.md resolves to a
  file, and a `#anchor` to one of that file's headings; every docs/*.md page is linked from the README.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
LISTED_PACKAGES = ["models", "p2p", "scripts"]  # every module below these must be in the README's tree
MARKDOWN_FILES = [
    README,
    *sorted((REPO / "docs").glob("*.md")),
    REPO / "models" / "weights" / "README.md",
    REPO / "notebooks" / "README.md",
]
TREE_INDENT = 4  # "├── " and "│   ": one level of the tree is four characters wide
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def fenced_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(info string, lines) of every ``` block, in order."""
    blocks, current, info = [], None, ""
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current, info = [], line[3:].strip()
            else:
                blocks.append((info, current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def prose_lines(text: str) -> list[str]:
    """The lines outside ``` blocks (a `# comment` in a bash block is not a heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def readme_tree() -> list[str]:
    """The paths of the README's tree block (the first ```text block after '## Layout'), folders ending in '/'."""
    text = README.read_text()
    assert "## Layout" in text, "the README has a '## Layout' section with the repository's file tree"
    blocks = [lines for info, lines in fenced_blocks(text[text.index("## Layout") :]) if info == "text"]
    assert blocks, "the README's '## Layout' section holds the tree in a ```text block"
    paths, parents = [], []
    for line in blocks[0]:
        match = re.match(r"^([│├└─\s]*)(\S+)", line)
        depth = len(match.group(1)) // TREE_INDENT
        assert depth <= len(parents), f"tree line indented past its parent folder: {line!r}"
        name = match.group(2)
        parents[depth:] = [name] if name.endswith("/") else []
        paths.append("".join(parents[:depth]) + name)
    return paths


def test_readme_opens_with_the_two_commands_and_the_makefile_has_them():
    info, lines = fenced_blocks(README.read_text())[0]
    commands = [line.split("#")[0].strip() for line in lines if line.strip()]
    assert commands[:2] == ["make demo", "make test"], f"the README's first commands are {commands[:2]}"
    makefile = (REPO / "Makefile").read_text()
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", makefile, re.MULTILINE), f"the Makefile has no '{target}:' target"


def test_every_path_in_the_readme_tree_exists():
    paths = readme_tree()
    missing = [path for path in paths if not (REPO / path).exists() or path.endswith("/") != (REPO / path).is_dir()]
    assert not missing, f"the README's tree lists {missing}, which the repository does not have (as file / folder)"


def modules_to_list() -> list[str]:
    expected = []
    for package in LISTED_PACKAGES:
        for path in sorted((REPO / package).rglob("*")):
            relative = path.relative_to(REPO).as_posix()
            if "__pycache__" in path.parts:
                continue
            if path.is_dir() and (path / "__init__.py").exists():
                expected.append(relative + "/")
            elif path.suffix == ".py" and not path.name.startswith("_"):  # __init__.py and private _helpers.py
                expected.append(relative)
    return expected


def test_every_package_and_module_is_in_the_readme_tree():
    listed = set(readme_tree())
    unlisted = [path for path in modules_to_list() if path not in listed]
    assert not unlisted, (
        f"{unlisted} exist but the README's tree does not list them; add each with a "
        "one-line description under '## Layout'"
    )


def heading_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {heading_anchor(line.lstrip("#")) for line in prose_lines(path.read_text()) if re.match(r"^#{1,6} ", line)}


def relative_links(path: Path) -> list[str]:
    return [
        target
        for line in prose_lines(path.read_text())
        for target in LINK.findall(line)
        if not re.match(r"^[a-z]+:", target)
    ]  # http:, https:, mailto: are not checked here


@pytest.mark.parametrize("path", MARKDOWN_FILES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(path):
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(
                f"{target} (no file {resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else resolved})"
            )
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading '#{anchor}' in {resolved.relative_to(REPO)})")
    assert not broken, f"{path.relative_to(REPO)} links to {broken}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / target.partition("#")[0]).resolve() for target in relative_links(README)}
    orphans = [page.name for page in sorted((REPO / "docs").glob("*.md")) if page.resolve() not in linked]
    assert not orphans, f"docs/{orphans} are not linked from the README; a newcomer would never find them"


def test_the_tree_parser_reads_nesting():
    """The tree's indentation decides each path; check the parser on the README's own first entries."""
    paths = readme_tree()
    assert "models/" in paths and "models/weights/tiny.safetensors" in paths and "p2p/real/inversion.py" in paths
