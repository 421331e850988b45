"""The docs hold together: the README stays a door with the two commands CI runs at the top, every page of docs/ is
on the maps, every relative link and #anchor leads somewhere, and the architecture page lists the layers
tests/test_layering.py enforces."""

import ast
import re

import pytest

from tests.helpers import ROOT
from tests.helpers.docs_commands import shell_lines

PAGES = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
LINKED = ["README.md", "CHANGELOG.md", "bench/README.md", *(f"docs/{p}" for p in PAGES)]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INSTALL_AND_TRAIN = ("python3.11 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install "
                     "-e . && python train.py")
INSTALL_AND_TEST = ('python3.11 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e '
                    '".[dev]" && python -m pytest')


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {slug(m) for m in re.findall(r"^#+\s+(.*)$", text, flags=re.M)}


def test_the_readme_is_a_door():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) < 12 * 1024
    assert [line for _, line in shell_lines(readme)][:2] == [INSTALL_AND_TRAIN, INSTALL_AND_TEST]


@pytest.mark.parametrize("page", PAGES)
def test_every_page_is_on_the_maps(page):
    assert f"](docs/{page})" in (ROOT / "README.md").read_text() or page == "README.md"
    assert f"]({page})" in (ROOT / "docs" / "README.md").read_text() or page == "README.md"


@pytest.mark.parametrize("doc", LINKED)
def test_links_lead_somewhere(doc):
    path = ROOT / doc
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{doc}: {target}"
        if anchor:
            assert anchor in anchors(linked), f"{doc}: {target} (anchors there: {sorted(anchors(linked))})"


def test_the_architecture_page_lists_the_enforced_layers():
    tree = ast.parse((ROOT / "tests" / "test_layering.py").read_text())
    layers = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                  and getattr(node.targets[0], "id", None) == "LAYERS")
    page = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"## The layers.*?```\n(.*?)```", page, flags=re.S).group(1)
    assert [line.split()[0] for line in block.splitlines() if line.strip()] == layers
