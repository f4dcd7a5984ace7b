"""The console's shell and its observing pages fit together: every navigation link names a page the
router knows, every page the router imports is a file the package ships, each page exports render, and no
script sets inline style (the CSP forbids it; geometry goes in SVG attributes or classes)."""

from __future__ import annotations

import re
from importlib import resources

STATIC = resources.files("meshpilot.console").joinpath("static")


def _text(name: str) -> str:
    return STATIC.joinpath(name).read_text()


def _pages() -> dict[str, str]:
    """The router's pages: name -> the file its module is imported from."""
    app = _text("app.js")
    imports = dict(re.findall(r'import \* as (\w+) from "\./([\w-]+\.js)";', app))
    listed = re.search(r"const PAGES = \{([^}]*)\};", app)
    assert listed, "expected app.js to list its PAGES"
    names = [n.strip() for n in listed.group(1).split(",") if n.strip()]
    missing = [n for n in names if n not in imports]
    assert not missing, f"expected every page in PAGES imported as a module, missing {missing}"
    return {n: imports[n] for n in names}


def test_every_navigation_link_is_a_page_the_router_knows() -> None:
    pages = _pages()
    links = re.findall(r'<a href="#/([\w-]+)" data-page="([\w-]+)">', _text("index.html"))
    assert links, "expected navigation links in index.html"
    for href, page in links:
        assert href == page and page in pages, f"expected #/{href} (data-page {page}) to be one of the router's pages {sorted(pages)}"
    for want in ("topology", "traces", "logs", "catalog"):
        assert want in [p for _, p in links], f"expected a link to the {want} page, got {links}"


def test_every_page_module_ships_and_exports_render() -> None:
    shipped = {p.name for p in STATIC.iterdir()}
    for name, file in _pages().items():
        assert file in shipped, f"expected page {name}'s module {file} in the package's static files {sorted(shipped)}"
        assert re.search(r"^export async function render\(", _text(file), re.M), f"expected {file} to export async render()"


def test_no_script_sets_inline_style() -> None:
    inline = re.compile(r"\.style\b|[\"']style[\"']\s*:|setAttribute\(\s*[\"']style")
    for p in STATIC.iterdir():
        if p.name.endswith(".js"):
            found = inline.search(p.read_text())
            assert found is None, f"expected {p.name} to set no inline style (the CSP refuses it), found {found.group(0)!r}"  # type: ignore[union-attr]


def test_svg_elements_take_the_namespace_of_the_pages_own_svg() -> None:
    assert '<svg id="svg-namespace"' in _text("index.html"), "expected the page's own <svg id=svg-namespace> that svg.js reads"
    assert 'getElementById("svg-namespace").namespaceURI' in _text("svg.js"), "expected svg.js to take the SVG namespace from the page"
