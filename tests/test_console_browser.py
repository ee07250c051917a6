"""Web console in a real browser: Playwright driving Debian's headless Chromium.

A real gateway (tests.gateway_support.build, uvicorn on a free 127.0.0.1
port) serves the console; the browser signs in as each role by keyboard,
checks what it may and may not open, filters the audit table, verifies the
log, sees a log tampered in its SQLite database reported with the index,
and tries a rollback whose CSRF token was stripped from the form. Every page
is saved as a screenshot (1280×800 and 390×844) under the test's tmp_path and
copied to ``test-artifacts/console/``.

Chromium comes from Debian (``.ci/run`` installs it), never from
``playwright install``. Without it the tests skip — unless
``FEDVAULT_REQUIRE_BROWSER=1`` (CI), where that is a failure.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.gateway.rest import create_rest_app
from tests.gateway_support import MODEL, Harness, build
from tests.he_support import live_server
from tests.test_console import EXPECTED, PAGES, tamper

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "console"
WIDE = {"width": 1280, "height": 800}
NARROW = {"width": 390, "height": 844}
HEADINGS = {
    "audit": "Audit log",
    "budgets": "Privacy budgets",
    "models": "Models",
    "monitoring": "Monitoring",
}

pytestmark = pytest.mark.integration


def _require_browser() -> None:
    missing = [
        what
        for what, ok in (
            ("/usr/bin/chromium", CHROMIUM.exists()),
            ("the playwright package", importlib.util.find_spec("playwright") is not None),
        )
        if not ok
    ]
    if missing:
        if os.environ.get("FEDVAULT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser tests required but {', '.join(missing)} missing")
        pytest.skip(f"{', '.join(missing)} not installed")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = build(tmp_path_factory.mktemp("console-browser"))
    yield h
    h.log.close()


@pytest.fixture(scope="module")
def url(harness: Harness, browser: Any) -> Iterator[str]:
    with live_server(create_rest_app(harness.gw)) as base:
        yield base


class Shots:
    """Screenshots into tmp_path, copied to test-artifacts/console/ for CI to keep."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def __call__(self, page: Any, name: str) -> None:
        path = self.directory / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        shutil.copy(path, ARTIFACTS / path.name)


@pytest.fixture
def shots(tmp_path: Path) -> Shots:
    return Shots(tmp_path)


def sign_in(browser: Any, url: str, token: str, viewport: dict[str, int] = WIDE) -> Any:
    """A fresh context signed in with ``token``, by keyboard only; its page."""
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    page.goto(f"{url}/console/login")
    for _ in range(5):  # autofocus, or Tab past the skip link and the brand link
        if page.evaluate("document.activeElement.id") == "api_key":
            break
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "api_key"
    page.keyboard.type(token)
    page.keyboard.press("Enter")
    page.wait_for_url(f"{url}/console/")
    return page


def unlabelled_controls(page: Any) -> list[str]:
    """Visible inputs, selects and buttons with no accessible name."""
    result: list[str] = page.evaluate(
        """() => [...document.querySelectorAll('input:not([type=hidden]), select, button')]
            .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                          && !(el.tagName === 'BUTTON' && el.textContent.trim()))
            .map(el => el.outerHTML)"""
    )
    return result


def overflows(page: Any) -> bool:
    """True when the page scrolls sideways (wide tables scroll inside their own box)."""
    return bool(
        page.evaluate("document.documentElement.scrollWidth > document.documentElement.clientWidth")
    )


@pytest.mark.parametrize("role", ["admin", "auditor", "partner", "analyst"])
def test_each_role_sees_exactly_its_pages(
    browser: Any, url: str, harness: Harness, shots: Shots, role: str
) -> None:
    page = sign_in(browser, url, harness.tokens[role])
    cookies = {c["name"]: c for c in page.context.cookies()}
    session = cookies["__Host-fedvault-console"]
    assert session["httpOnly"]
    assert session["secure"]
    assert session["sameSite"] == "Strict"
    assert harness.tokens[role] not in session["value"]
    assert page.evaluate("document.cookie") == ""  # HttpOnly: invisible to scripts
    nav = page.locator("header nav a").all_inner_texts()
    assert nav == [HEADINGS[p] for p in PAGES if p in EXPECTED[role]]
    shots(page, f"{role}-home")
    for name in PAGES:
        response = page.goto(f"{url}/console/{name}")
        assert response is not None
        if name in EXPECTED[role]:
            assert response.status == 200, (role, name)
            assert page.locator("h1").inner_text() == HEADINGS[name]
            assert unlabelled_controls(page) == []
            assert not overflows(page)
            shots(page, f"{role}-{name}")
        else:
            assert response.status == 403, (role, name)
            assert page.locator("h1").inner_text() == "Not for your role"
            shots(page, f"{role}-{name}-403")
    page.context.close()


def test_partner_page_shows_only_its_own_spend(browser: Any, url: str, harness: Harness) -> None:
    page = sign_in(browser, url, harness.tokens["partner"])
    page.goto(f"{url}/console/budgets")
    assert page.locator("svg.chart polyline").count() == 1
    assert "beta" not in (page.locator("main").text_content() or "")
    page.goto(f"{url}/console/models")
    page.locator("summary").first.click()  # lineage sits in a closed <details>
    assert "alpha (you)" in page.locator("main details").first.inner_text()
    assert "beta" not in (page.locator("main").text_content() or "")
    assert page.get_by_role("button", name="Roll back").count() == 0
    page.context.close()


def test_narrow_window_and_keyboard(browser: Any, url: str, harness: Harness, shots: Shots) -> None:
    page = sign_in(browser, url, harness.tokens["admin"], NARROW)
    for name in PAGES:
        page.goto(f"{url}/console/{name}")
        assert not overflows(page), name
        shots(page, f"narrow-admin-{name}")
    page.goto(f"{url}/console/audit")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"
    page.context.close()


def test_model_schema_and_metrics_fit_a_narrow_window(
    browser: Any, url: str, harness: Harness, shots: Shots
) -> None:
    page = sign_in(browser, url, harness.tokens["admin"], NARROW)
    page.goto(f"{url}/console/models")
    page.locator("details.schema summary").first.click()
    table = page.locator("details.schema table.schema-features").first
    assert table.is_visible()
    assert "mean_radius" in table.inner_text()  # the built-in schema of a legacy lineage
    page.evaluate("document.querySelectorAll('details').forEach(d => { d.open = true; })")
    assert not overflows(page)  # wide tables scroll inside their own box
    shots(page, "narrow-admin-models-open")
    page.context.close()


def test_rollback_without_csrf_token_is_refused(
    browser: Any, url: str, harness: Harness, shots: Shots
) -> None:
    repo = harness.gw.service.repository
    before = repo.default_version(MODEL)
    page = sign_in(browser, url, harness.tokens["admin"])
    page.goto(f"{url}/console/models")
    form = page.locator(f'form[action="/console/models/{MODEL}/rollback"]')
    form.locator('input[name="csrf_token"]').evaluate("el => el.remove()")
    form.get_by_label("Make default").select_option("1")
    with page.expect_navigation() as nav:
        form.get_by_role("button", name="Roll back").click()
    assert nav.value.status == 403
    assert page.locator("h1").inner_text() == "Request refused"
    assert repo.default_version(MODEL) == before
    shots(page, "admin-rollback-no-csrf")
    page.goto(f"{url}/console/models")
    form.get_by_label("Make default").select_option("1")
    form.get_by_role("button", name="Roll back").click()
    page.wait_for_url(re.compile(r".*/console/models\?rolled_back=.*"))
    assert "Default changed" in page.locator("main").inner_text()
    assert repo.default_version(MODEL) == "1"
    shots(page, "admin-rollback-done")
    repo.rollback(MODEL, before, actor="test")
    page.context.close()


def test_audit_filter_verify_and_tampered_log(
    browser: Any, url: str, harness: Harness, shots: Shots
) -> None:
    """Last in this module: it tampers the shared harness's audit database."""
    partner = sign_in(browser, url, harness.tokens["partner"])
    assert partner.goto(f"{url}/console/audit").status == 403  # a denied entry to find
    partner.context.close()
    page = sign_in(browser, url, harness.tokens["auditor"])
    page.goto(f"{url}/console/audit")
    page.get_by_label("Outcome").select_option("denied")
    page.get_by_label("Role").select_option("partner")
    page.get_by_role("button", name="Apply filter").click()
    page.wait_for_url(re.compile(r".*outcome=denied.*"))
    tags = page.locator("table.entries tbody .tag").all_inner_texts()
    assert tags
    assert set(tags) == {"denied"}
    roles = page.locator("table.entries tbody tr td:nth-child(4)").all_inner_texts()
    assert set(roles) == {"partner"}
    shots(page, "auditor-audit-filtered")
    page.get_by_role("button", name="Verify the log now").click()
    result = page.locator("#verify-result")
    result.get_by_text("Verified", exact=True).wait_for()
    assert "First verification" in result.inner_text()
    page.get_by_role("button", name="Verify the log now").click()
    page.locator("#verify-result").get_by_text("Consistent with the checkpoint").wait_for()
    shots(page, "auditor-audit-verified")
    page.locator("table.entries tbody a").first.click()
    assert page.locator("h1").inner_text().startswith("Audit entry")
    assert "Verified" in page.locator("#proof-h + p").inner_text()
    shots(page, "auditor-audit-entry")

    tamper(harness.home / "audit.db", 3)
    page.goto(f"{url}/console/audit")
    page.get_by_role("button", name="Verify the log now").click()
    failed = page.locator("#verify-result").get_by_text("Failed at index 3", exact=True)
    failed.wait_for()
    shots(page, "auditor-audit-tampered")
    page.get_by_role("link", name="Open entry 3").click()
    assert "Not verified" in page.locator("#proof-h + p").inner_text()
    assert "key:forged" in page.locator("main").inner_text()
    shots(page, "auditor-audit-entry-tampered")
    page.context.close()
