"""Web console without a browser: sessions, cookie flags, CSRF, the role matrix, audit views.

The gateway is the real one (tests.gateway_support.build: sealed registry
models, SQLite key store and audit log), driven in process through
Starlette's TestClient over ``https://`` so the Secure cookie is sent back.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from server.audit.records import decode_entry, encode_record
from server.console.charts import epsilon_chart
from server.console.monitoring import histogram_quantile
from server.console.policy import PAGE_ROLES, Page
from server.console.sessions import SESSION_COOKIE, SessionStore
from server.gateway.rest import create_rest_app
from tests.gateway_support import MODEL, Harness, build

PAGES = ("audit", "budgets", "models", "monitoring")
EXPECTED = {
    "admin": {"audit", "budgets", "models", "monitoring"},
    "auditor": {"audit", "budgets", "monitoring"},
    "partner": {"budgets", "models"},
    "analyst": {"models"},
}


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    h = build(tmp_path_factory.mktemp("console"))
    yield h
    h.log.close()


@pytest.fixture(scope="module")
def app(harness: Harness) -> object:
    return create_rest_app(harness.gw)


def _client(app: object) -> TestClient:
    return TestClient(app, base_url="https://testserver")  # type: ignore[arg-type]


def _hidden(html: str, name: str) -> str:
    found = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert found, f"no hidden {name} in page"
    return found.group(1)


def login(app: object, token: str) -> TestClient:
    client = _client(app)
    form = client.get("/console/login")
    response = client.post(
        "/console/login",
        data={"login_csrf": _hidden(form.text, "login_csrf"), "api_key": token},
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text
    return client


def _csrf(client: TestClient, page: str = "/console/") -> str:
    return _hidden(client.get(page).text, "csrf_token")


def _entries(h: Harness) -> list[dict[str, object]]:
    return [decode_entry(e).to_json_dict() for _, e in h.log.entries(0, h.log.size())]


def test_session_cookie_flags_and_no_key_anywhere(harness: Harness, app: object) -> None:
    client = _client(app)
    form = client.get("/console/login")
    assert form.status_code == 200
    token = harness.tokens["auditor"]
    response = client.post(
        "/console/login",
        data={"login_csrf": _hidden(form.text, "login_csrf"), "api_key": token},
        follow_redirects=False,
    )
    assert response.status_code == 303
    cookie = next(
        c for c in response.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE)
    )
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "secure", "samesite=strict", "path=/"} <= flags
    assert token not in cookie
    assert token.split("_")[1] not in cookie.split(";")[0]
    page = client.get("/console/audit")
    assert page.status_code == 200
    assert token not in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"
    # A failed sign-in does not echo the key either.
    bad = _client(app)
    form = bad.get("/console/login")
    wrong = token[:-4] + "AAAA"
    refused = bad.post(
        "/console/login", data={"login_csrf": _hidden(form.text, "login_csrf"), "api_key": wrong}
    )
    assert refused.status_code == 401
    assert wrong not in refused.text
    assert "unknown, revoked or expired" in refused.text
    assert SESSION_COOKIE not in refused.headers.get("set-cookie", "")


def test_login_needs_its_csrf_cookie(harness: Harness, app: object) -> None:
    client = _client(app)
    response = client.post("/console/login", data={"api_key": harness.tokens["admin"]})
    assert response.status_code == 403
    assert SESSION_COOKIE not in client.cookies


@pytest.mark.parametrize("role", sorted(EXPECTED))
def test_each_role_sees_exactly_its_pages(harness: Harness, app: object, role: str) -> None:
    client = login(app, harness.tokens[role])
    home = client.get("/console/")
    nav = set(re.findall(r'<li><a href="/console/(\w+)"', home.text))
    assert nav == EXPECTED[role]
    for page in PAGES:
        response = client.get(f"/console/{page}")
        want = 200 if page in EXPECTED[role] else 403
        assert response.status_code == want, (role, page)
        if want == 403:
            assert "Not for your role" in response.text
    assert {r for p, rs in PAGE_ROLES.items() if p != Page.ROLLBACK for r in rs} == set(EXPECTED)


def test_signed_out_pages_answer_401_with_the_login_form(app: object) -> None:
    client = _client(app)
    for page in (*PAGES, "", "audit/entries/0", "audit/export.csv"):
        response = client.get(f"/console/{page}")
        assert response.status_code == 401, page
        assert 'name="api_key"' in response.text
    assert client.post("/console/audit/verify", data={"csrf_token": "x"}).status_code == 401


def test_partner_sees_only_its_own_ledger_and_models(harness: Harness, app: object) -> None:
    alpha = login(app, harness.tokens["partner"])
    page = alpha.get("/console/budgets").text
    assert "run-gw" in page
    assert "<td>alpha</td>" in page
    assert "<td>beta</td>" not in page
    assert "beta" not in page
    models = alpha.get("/console/models").text
    assert MODEL in models
    assert "alpha (you)" in models
    assert "beta" not in models
    gamma = login(app, harness.tokens["partner-gamma"])
    assert "No runs to show" in gamma.get("/console/budgets").text
    assert "No models to show" in gamma.get("/console/models").text
    analyst = login(app, harness.tokens["analyst"]).get("/console/models").text
    assert MODEL in analyst
    assert "bc-mlp" not in analyst


def test_auditor_budgets_chart_and_statement(harness: Harness, app: object) -> None:
    page = login(app, harness.tokens["auditor"]).get("/console/budgets").text
    assert '<svg class="chart"' in page
    assert "<polyline" in page
    assert "cap ε=3" in page  # target_epsilon from the model's lineage
    assert "rdp 1.6" in page
    assert "1e-05" in page
    assert "Each partner&#39;s training data is protected" in page


def test_rollback_needs_csrf_admin_and_is_audited(harness: Harness, app: object) -> None:
    repo = harness.gw.service.repository
    admin = login(app, harness.tokens["admin"])
    before = repo.default_version(MODEL)
    no_token = admin.post(f"/console/models/{MODEL}/rollback", data={"version": "1"})
    assert no_token.status_code == 403
    assert "CSRF" in no_token.text
    wrong = admin.post(
        f"/console/models/{MODEL}/rollback", data={"version": "1", "csrf_token": "forged"}
    )
    assert wrong.status_code == 403
    token = _csrf(admin, "/console/models")
    cross = admin.post(
        f"/console/models/{MODEL}/rollback",
        data={"version": "1", "csrf_token": token},
        headers={"Origin": "https://evil.example"},
    )
    assert cross.status_code == 403
    opaque = admin.post(  # what a sandboxed frame or a no-referrer page sends
        f"/console/models/{MODEL}/rollback",
        data={"version": "1", "csrf_token": token},
        headers={"Origin": "null"},
    )
    assert opaque.status_code == 403
    assert repo.default_version(MODEL) == before
    auditor = login(app, harness.tokens["auditor"])
    denied = auditor.post(
        f"/console/models/{MODEL}/rollback", data={"version": "1", "csrf_token": _csrf(auditor)}
    )
    assert denied.status_code == 403
    assert repo.default_version(MODEL) == before
    done = admin.post(
        f"/console/models/{MODEL}/rollback",
        data={"version": "1", "csrf_token": token},
        follow_redirects=False,
    )
    assert done.status_code == 303
    assert repo.default_version(MODEL) == "1"
    records = _entries(harness)
    rollbacks = [r for r in records if r["action"] == "rest:console_rollback"]
    assert [r["outcome"] for r in rollbacks] == ["denied"] * 5 + ["ok"]
    assert rollbacks[-1]["resource"] == f"model:{MODEL}/1"
    admin_id = harness.gw.store.keys()[0].key_id
    assert rollbacks[-1]["actor"] == f"key:{admin_id}"
    assert rollbacks[-1]["role"] == "admin"
    page = admin.get("/console/models").text
    assert f"{MODEL} → v1" not in page  # the notice is only on the redirect target
    repo.rollback(MODEL, "2", actor="test")  # restore for the other tests


def test_logout_and_revocation_end_the_session(harness: Harness, app: object) -> None:
    client = login(app, harness.tokens["auditor"])
    token = _csrf(client)
    assert client.post("/console/logout", data={"csrf_token": "nope"}).status_code == 403
    out = client.post("/console/logout", data={"csrf_token": token}, follow_redirects=False)
    assert out.status_code == 303
    assert client.get("/console/audit").status_code == 401
    store = harness.gw.store
    secret, key = store.create_key("auditor")
    victim = login(app, secret)
    assert victim.get("/console/audit").status_code == 200
    store.revoke(key.key_id)
    assert victim.get("/console/audit").status_code == 401


def test_console_requests_are_audited_with_actor_and_role(harness: Harness, app: object) -> None:
    client = login(app, harness.tokens["partner"])
    client.get("/console/audit")
    client.get("/console/budgets")
    records = _entries(harness)
    partner = [r for r in records if r["role"] == "partner" and r["action"] != "rest:console_login"]
    assert {"action": "rest:console_audit", "outcome": "denied"}.items() <= partner[-2].items()
    assert {"action": "rest:console_budgets", "outcome": "ok"}.items() <= partner[-1].items()
    logins = [r for r in records if r["action"] == "rest:console_login"]
    assert {r["outcome"] for r in logins} >= {"ok", "denied"}


def test_audit_filter_pagination_and_exports(harness: Harness, app: object) -> None:
    client = login(app, harness.tokens["auditor"])
    client.get("/console/%3Cscript%3Ealert(1)%3C/script%3E")  # a hostile path, then audited
    page = client.get("/console/audit", params={"outcome": "denied"}).text
    outcomes = re.findall(r'class="tag tag-(\w+)"', page)
    assert outcomes
    assert set(outcomes) == {"denied"}
    everything = client.get("/console/audit").text
    assert "<script>alert(1)" not in everything
    assert "&lt;script&gt;alert(1)" in everything
    assert 'rel="next"' in everything  # more than one page by now
    second = client.get("/console/audit", params={"page": 1}).text
    assert re.findall(r"Entry (\d+) details", second)[0] < re.findall(r"Entry (\d+)", everything)[0]
    bad = client.get("/console/audit", params={"since": "yesterday", "role": "root"})
    assert bad.status_code == 200
    assert "ignored" in bad.text
    lines = client.get("/console/audit/export.jsonl", params={"outcome": "denied"}).text
    rows = [json.loads(line) for line in lines.splitlines()]
    assert rows
    assert {r["outcome"] for r in rows} == {"denied"}
    assert all(len(r["leaf_hash"]) == 64 for r in rows)
    exported = client.get("/console/audit/export.csv", params={"actor": "anonymous"})
    assert exported.headers["content-disposition"].startswith("attachment;")
    table = list(csv.DictReader(io.StringIO(exported.text)))
    assert table
    assert {r["actor"] for r in table} == {"anonymous"}


def test_csv_cells_never_start_a_formula() -> None:
    from server.console.auditview import _cell

    assert _cell("=HYPERLINK(1)") == "'=HYPERLINK(1)"
    assert _cell("+1") == "'+1"
    assert _cell("@x") == "'@x"
    assert _cell("-2") == "'-2"
    assert _cell("/v2/models") == "/v2/models"
    assert _cell(None) == ""


def test_entry_detail_verification_and_tampering(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    h = build(tmp_path_factory.mktemp("console-tamper"))
    try:
        app = create_rest_app(h.gw)
        client = login(app, h.tokens["auditor"])
        for _ in range(5):
            client.get("/console/budgets")
        h.log.checkpoint(force=True)
        detail = client.get("/console/audit/entries/2").text
        assert "Verified</strong>: included in the signed tree" in detail
        token = _csrf(client, "/console/audit")
        first = client.post("/console/audit/verify", data={"csrf_token": token}).text
        assert "<strong>Verified</strong>" in first
        assert "First verification" in first
        again = client.post(
            "/console/audit/verify",
            data={"csrf_token": token},
            headers={"X-Console-Fragment": "verify"},
        )
        assert again.text.lstrip().startswith('<div id="verify-result"')
        assert "Consistent with the checkpoint of size" in again.text
        tamper(h.home / "audit.db", 2)
        failed = client.post("/console/audit/verify", data={"csrf_token": token}).text
        assert "Failed at index 2" in failed
        fresh = login(app, h.tokens["auditor"])
        token2 = _csrf(fresh, "/console/audit")
        assert (
            "Failed at index 2"
            in fresh.post("/console/audit/verify", data={"csrf_token": token2}).text
        )
        assert "Not verified" in fresh.get("/console/audit/entries/2").text
    finally:
        h.log.close()


def tamper(db: Path, index: int) -> None:
    """Rewrite one entry in place, as an operator with database access could."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        for trigger in ("audit_entries_no_update", "audit_entries_no_delete"):
            conn.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        (entry,) = conn.execute(
            "SELECT entry FROM audit_entries WHERE idx = ?", (index,)
        ).fetchone()
        forged = decode_entry(bytes(entry)).model_copy(update={"actor": "key:forged"})
        conn.execute(
            "UPDATE audit_entries SET entry = ? WHERE idx = ?", (encode_record(forged), index)
        )
    finally:
        conn.close()


def test_monitoring_reads_the_gateway_registry(harness: Harness, app: object) -> None:
    from tests.gateway_support import features

    x = features(4)
    body = {
        "inputs": [
            {"name": "features", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}
        ]
    }
    analyst = _client(app)
    auth = {"Authorization": f"Bearer {harness.tokens['analyst']}"}
    for _ in range(3):
        assert analyst.post(f"/v2/models/{MODEL}/infer", json=body, headers=auth).status_code == 200
    page = login(app, harness.tokens["auditor"]).get("/console/monitoring").text
    assert f'<th scope="row">{MODEL}</th>' in page
    assert "ms</td>" in page
    assert "rows</td>" in page
    assert "writable" in page


# ------------------------------------------------------------------ pure parts
def test_histogram_quantile_interpolates_like_promql() -> None:
    buckets = [(0.1, 50.0), (0.2, 100.0), (float("inf"), 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.198)
    assert histogram_quantile(0.99, [(float("inf"), 0.0)]) is None
    assert histogram_quantile(0.99, [(0.1, 1.0), (float("inf"), 100.0)]) == 0.1


def test_chart_scales_to_the_cap_and_orders_series() -> None:
    chart = epsilon_chart({"b": [(1, 1.0), (2, 2.0)], "a": [(1, 0.5)]}, cap=3.0)
    assert [s.label for s in chart.series] == ["a", "b"]
    assert chart.cap_y is not None
    assert chart.plot_top <= chart.cap_y < chart.plot_bottom
    b = chart.series[1].points
    assert b[0].y > b[1].y  # more ε is higher on the page
    assert chart.y_ticks[-1].position <= chart.cap_y
    empty = epsilon_chart({}, None)
    assert empty.series == []
    assert empty.cap_y is None


def test_sessions_expire_when_idle_or_old() -> None:
    now = [0.0]
    store = SessionStore(idle_s=10, absolute_s=25, clock=lambda: now[0])
    from server.console.policy import ConsoleUser

    sid, _ = store.create(ConsoleUser("k1", "auditor", None, frozenset()))
    now[0] = 9
    assert store.get(sid) is not None
    now[0] = 18
    assert store.get(sid) is not None  # used at 9: still within the idle limit
    now[0] = 26
    assert store.get(sid) is None  # past the absolute lifetime
    sid, _ = store.create(ConsoleUser("k1", "auditor", None, frozenset()))
    now[0] = 40
    assert store.get(sid) is None
    assert len(store) == 0
    assert store.get(None) is None
    assert store.get("x" * 500) is None
