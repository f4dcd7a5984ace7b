"""Try-it in the console, in a real browser (Debian's headless Chromium, driven by Playwright), against
the mesh of tests/e2e/test_catalog_tryit.py: a control plane with its own sidecar (``meshpilot-console``)
and the ``inventory`` service behind its sidecar with its catalog, tracing 0 % of new traces.

On the catalog page of ``inventory``, the try-it form of an operation is filled and sent: the answer
shows the app's status and body (as text: a body holding markup stays characters), and the try's
trace appears inline as a waterfall once the sidecars have shipped it, with the client span of the
control plane's sidecar and the server span of inventory's sidecar, without leaving the page."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.test_catalog_tryit import SERVICE, TryMesh, try_mesh
from tests.e2e.test_console import CHROMIUM, browser, sign_in_at, watched_tab  # noqa: F401 (browser: a fixture used here)
from tests.e2e.test_sidecar import TOKEN
from tests.support import tmpdir

playwright = pytest.importorskip("playwright.sync_api", reason="the console's browser tests need playwright (pip install -e '.[test]')")
pytestmark = pytest.mark.e2e

HOSTILE = "<img src=x onerror=window.__pwned=1>"  # no quotes: the app's JSON would escape them


@pytest.fixture(scope="module")
def mesh() -> Iterator[TryMesh]:
    if not CHROMIUM.exists():
        pytest.fail(f"expected Debian's chromium at {CHROMIUM} (run.sh installs it)")
    with try_mesh(tmpdir("meshpilot-console-tryit-")) as m:
        yield m


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:  # noqa: F811 (browser: the imported fixture)
    with watched_tab(browser, height=1000) as pg:
        yield pg


def _open_try(pg: Any, mesh: TryMesh, operation: str) -> None:
    sign_in_at(pg, mesh.cp.api, TOKEN)
    pg.goto(f"{mesh.cp.api}/ui/#/catalog/default/{SERVICE}")
    pg.wait_for_selector("#operations")
    pg.click(f"#operations button.try-button[data-operation={operation}]")
    pg.wait_for_selector(f"#try-panel[data-operation={operation}]")


def test_the_try_it_form_shows_the_response_and_the_trace_inline(page: Any, mesh: TryMesh) -> None:
    _open_try(page, mesh, "getItem")
    page.fill("#try-panel input[name='path.id']", "blue mug")
    page.fill("#try-panel input[name='query.fields']", "price")
    page.click("#try-send")
    page.wait_for_selector("#try-status", timeout=20_000)
    status = page.inner_text("#try-status")
    answer = json.loads(page.inner_text("#try-response"))
    assert status.startswith("200") and answer["item"] == "/items/blue%20mug?fields=price", f"expected the app's 200 for /items/blue%20mug, got {status!r} {answer}"
    assert answer["caller"] == "meshpilot-console", f"expected the request to come from the control plane's sidecar, got {answer}"
    trace_id = answer["traceparent"].split("-")[1]
    assert page.get_attribute("#try-trace .tryit-trace", "data-trace") == trace_id, "expected the inline trace to be the try's"
    page.wait_for_selector("#try-trace .tryit-trace[data-complete=true]", timeout=60_000)
    rows = page.locator("#try-trace .span-row[data-service]")
    seen = {(rows.nth(i).get_attribute("data-service"), rows.nth(i).get_attribute("data-kind")) for i in range(rows.count())}
    assert {("meshpilot-console", "CLIENT"), (SERVICE, "SERVER")} <= seen, f"expected both sidecars' spans in the inline waterfall, got {seen}"
    bars = page.locator("#try-trace svg.span-bar rect").count()
    assert bars == rows.count(), f"expected a bar for each of the {rows.count()} spans, got {bars}"


def test_a_body_that_looks_like_markup_is_shown_as_text(page: Any, mesh: TryMesh) -> None:
    _open_try(page, mesh, "createItem")
    page.fill("#try-body", json.dumps({"name": HOSTILE}))
    page.click("#try-send")
    page.wait_for_selector("#try-status", timeout=20_000)
    assert page.inner_text("#try-status").startswith("201"), f"expected the app's 201, got {page.inner_text('#try-status')!r}"
    assert HOSTILE in page.inner_text("#try-response"), f"expected the markup shown as characters, got {page.inner_text('#try-response')!r}"
    assert page.locator("main img").count() == 0 and page.evaluate("window.__pwned") is None, "expected no element or script made from the body"
