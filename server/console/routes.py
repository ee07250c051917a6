"""The console's routes: a FastAPI router the gateway includes, so its middleware audits them.

Why inside the gateway app rather than a separate one: the audit
middleware (:class:`server.gateway.rest.AuditMiddleware`) then records every
console request — page views, logins, refused CSRF, rollbacks — exactly as
it records API calls, with the signed-in key as actor and its role; and the
key store, rate limiter and repository are the gateway's own objects.
Routes are left out of the OpenAPI document: they answer HTML for people,
not a contract for programs.

Authentication: a form POST of an API key (verified by the gateway's
:class:`~server.gateway.keys.KeyVerifier`) opens a server-side session
(:mod:`server.console.sessions`); each request re-reads the key, so a
revoked or expired key ends its sessions at once. Errors are HTML pages
with the status of :func:`fedvault.errors.mapping_for` — the same statuses
the API answers — and never echo the key.
"""

# No ``from __future__ import annotations``: FastAPI resolves handler signatures at runtime.
import functools
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final, ParamSpec
from urllib.parse import parse_qs, urlencode, urlsplit

import jinja2
from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from fedvault.errors import (
    AuthenticationError,
    FedvaultError,
    InvalidRequestError,
    NotFoundError,
    mapping_for,
)
from server.audit.records import InvalidEntry, decode_entry
from server.console import auditview
from server.console.budgets import load_budgets
from server.console.catalogue import load_models
from server.console.monitoring import KS_ALERT, KS_WARN, PSI_ALERT, PSI_WARN, Monitor
from server.console.policy import ConsoleUser, Page
from server.console.sessions import (
    CSRF_FIELD,
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    ConsoleSession,
    SessionStore,
    same_token,
)
from server.gateway.audit import AuditEvent
from server.gateway.rest import AUDIT_SCOPE_KEY, GatewayApp

__all__ = ["PREFIX", "Console", "create_console_router"]

PREFIX: Final = "/console"
_HERE = Path(__file__).parent
_STATIC_TYPES: Final = {
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
}
_MAX_FORM: Final = 16 * 1024
_SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_ROLE_SUMMARY: Final = {
    "admin": "everything: audit log, privacy budgets, models (with rollback), monitoring",
    "auditor": "the audit log and its verification, privacy budgets, monitoring",
    "partner": "your own privacy-ledger rows and the models you helped train",
    "analyst": "the models your key is granted",
}

P = ParamSpec("P")


class _Refused(Exception):
    """Ends a handler with a ready response (login page, 403 page)."""

    def __init__(self, response: Response) -> None:
        self.response = response


def _secure(response: Response) -> Response:
    for name, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def _event(request: Request) -> AuditEvent | None:
    event = request.scope.get(AUDIT_SCOPE_KEY)
    return event if isinstance(event, AuditEvent) else None


def _safe_next(target: str | None) -> str:
    """Only a console path of ours: no scheme, no host, no ``//`` (open-redirect guard)."""
    if not target or not target.startswith(PREFIX) or "//" in target or "\\" in target:
        return PREFIX + "/"
    return target[:500]


class Console:
    """Everything the console's routes share: the gateway, sessions, templates, monitor."""

    def __init__(self, gw: GatewayApp, *, sessions: SessionStore | None = None) -> None:
        self.gw = gw
        self.sessions = sessions or SessionStore()
        self.monitor = Monitor(gw.metrics.registry)
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(_HERE / "templates"),
            autoescape=True,  # every template, .html or not: nothing reaches a page unescaped
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.globals["prefix"] = PREFIX
        self.static = {name: (_HERE / "static" / name).read_bytes() for name in _STATIC_TYPES}

    # ------------------------------------------------------------------ pages
    def page(
        self,
        template: str,
        *,
        status: int = 200,
        session: ConsoleSession | None = None,
        active: str = "",
        **context: Any,
    ) -> HTMLResponse:
        user = session.user if session else None
        html = self.templates.get_template(template).render(
            user=user,
            csrf=session.csrf if session else "",
            csrf_field=CSRF_FIELD,
            nav=user.nav if user else [],
            active=active,
            **context,
        )
        response = HTMLResponse(html, status_code=status)
        _secure(response)
        return response

    def login_page(
        self, request: Request, *, status: int, error: str | None = None
    ) -> HTMLResponse:
        """The login form with a fresh double-submit token (cookie + hidden field)."""
        import secrets

        token = secrets.token_urlsafe(32)
        target = request.url.path
        if request.url.query:
            target += "?" + request.url.query
        response = self.page(
            "login.html",
            status=status,
            login_csrf=token,
            next=_safe_next(target if request.method == "GET" else None),
            error=error,
        )
        response.set_cookie(
            LOGIN_CSRF_COOKIE, token, httponly=True, secure=True, samesite="strict", path="/"
        )
        return response

    def error_page(
        self, status: int, title: str, message: str, session: ConsoleSession | None
    ) -> HTMLResponse:
        return self.page("error.html", status=status, session=session, title=title, message=message)

    # --------------------------------------------------------------- sessions
    def current(self, request: Request) -> ConsoleSession | None:
        """The live session of this request, its key re-checked; notes the actor for audit."""
        session_id = request.cookies.get(SESSION_COOKIE)
        session = self.sessions.get(session_id)
        if session is None:
            return None
        verifier = self.gw.authenticator.verifier
        try:
            verifier.check_live(self.gw.store.key(session.user.key_id))
        except (AuthenticationError, NotFoundError):
            self.sessions.drop_key(session.user.key_id)
            return None
        event = _event(request)
        if event is not None:
            event.key_id, event.role = session.user.key_id, session.user.role
        self.gw.authenticator.limiter.check(session.user.key_id)
        return session

    def require(self, request: Request, page: Page | None) -> ConsoleSession:
        session = self.current(request)
        if session is None:
            raise _Refused(self.login_page(request, status=401))
        if page is not None and not session.user.may(page):
            raise _Refused(
                self.error_page(
                    403,
                    "Not for your role",
                    f"The {page.value} page is not open to the {session.user.role} role.",
                    session,
                )
            )
        return session

    async def form(self, request: Request) -> dict[str, str]:
        """A small urlencoded form (the only kind the console's pages send)."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/x-www-form-urlencoded":
            raise InvalidRequestError("the console accepts urlencoded forms only")
        body = await request.body()
        if len(body) > _MAX_FORM:
            raise InvalidRequestError("form too large")
        try:
            parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=32)
        except (UnicodeDecodeError, ValueError):
            raise InvalidRequestError("malformed form") from None
        return {k: v[0] for k, v in parsed.items()}

    def require_post(
        self, request: Request, form: dict[str, str], page: Page | None
    ) -> ConsoleSession:
        """A session that may do ``page``, a matching CSRF token, and a same-origin request."""
        session = self.require(request, page)
        origin = request.headers.get("origin")
        host = request.headers.get("host", "")
        same_origin = origin is None or urlsplit(origin).netloc == host
        if not same_origin or not same_token(form.get(CSRF_FIELD), session.csrf):
            raise _Refused(
                self.error_page(
                    403,
                    "Request refused",
                    "The form's CSRF token is missing or wrong (or it came from another "
                    "site), so nothing was changed. Reload the page and try again.",
                    session,
                )
            )
        return session


def _html_errors(
    console: Console,
) -> Callable[[Callable[P, Awaitable[Response]]], Callable[P, Awaitable[Response]]]:
    """FedvaultErrors and refusals become HTML pages (the API's status, never a traceback)."""

    def wrap(handler: Callable[P, Awaitable[Response]]) -> Callable[P, Awaitable[Response]]:
        @functools.wraps(handler)
        async def guarded(*args: P.args, **kwargs: P.kwargs) -> Response:
            try:
                return await handler(*args, **kwargs)
            except _Refused as refused:
                return refused.response
            except FedvaultError as exc:
                request = kwargs.get("request")
                session = console.current(request) if isinstance(request, Request) else None
                status = mapping_for(exc).http_status
                return console.error_page(status, type(exc).__name__, str(exc), session)

        return guarded

    return wrap


def _query(request: Request) -> dict[str, str]:
    return {k: v for k, v in request.query_params.items()}


def create_console_router(gw: GatewayApp, *, console: Console | None = None) -> APIRouter:
    """Routes under ``/console`` (HTML pages, static files), left out of the OpenAPI document."""
    con = console or Console(gw)
    router = APIRouter(prefix=PREFIX, include_in_schema=False)
    html = _html_errors(con)

    @router.get("/static/{name}", name="console_static")
    async def static(name: Annotated[str, PathParam(max_length=64)]) -> Response:
        if name not in con.static:
            raise NotFoundError("no such console file")
        response = Response(con.static[name], media_type=_STATIC_TYPES[name])
        response.headers["Cache-Control"] = "public, max-age=3600"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    # ---------------------------------------------------------------- sign-in
    @router.get("/login", name="console_login_form")
    @html
    async def login_form(request: Request) -> Response:
        if con.current(request) is not None:
            return _secure(RedirectResponse(PREFIX + "/", status_code=303))
        return con.login_page(request, status=200)

    @router.post("/login", name="console_login")
    @html
    async def login(request: Request) -> Response:
        form = await con.form(request)
        if not same_token(form.get("login_csrf"), request.cookies.get(LOGIN_CSRF_COOKIE, "")):
            return con.login_page(
                request, status=403, error="The sign-in form expired. Please try again."
            )
        token = form.get("api_key", "").strip()
        verifier = gw.authenticator.verifier
        try:
            if not token or len(token) > 256:
                raise AuthenticationError("malformed API key")
            hit, key = verifier.cached(token)
            if not hit:
                key = await run_in_threadpool(verifier.verify, token)
            live = verifier.check_live(key)
        except AuthenticationError:
            # One message for unknown, wrong, revoked and expired keys, as the API.
            return con.login_page(
                request, status=401, error="That API key is unknown, revoked or expired."
            )
        gw.authenticator.limiter.check(live.key_id)
        event = _event(request)
        if event is not None:
            event.key_id, event.role = live.key_id, live.role
        user = ConsoleUser(live.key_id, live.role, live.partner, live.models)
        session_id, _ = con.sessions.create(user)
        response = RedirectResponse(_safe_next(form.get("next")), status_code=303)
        response.set_cookie(
            SESSION_COOKIE, session_id, httponly=True, secure=True, samesite="strict", path="/"
        )
        response.delete_cookie(
            LOGIN_CSRF_COOKIE, path="/", secure=True, httponly=True, samesite="strict"
        )
        return _secure(response)

    @router.post("/logout", name="console_logout")
    @html
    async def logout(request: Request) -> Response:
        form = await con.form(request)
        con.require_post(request, form, None)
        con.sessions.drop(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse(PREFIX + "/login", status_code=303)
        response.delete_cookie(
            SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="strict"
        )
        return _secure(response)

    @router.get("", name="console_home")
    @router.get("/", name="console_home_slash")
    @html
    async def home(request: Request) -> Response:
        session = con.require(request, None)
        return con.page(
            "home.html",
            session=session,
            summary=_ROLE_SUMMARY.get(session.user.role, "nothing"),
        )

    # ------------------------------------------------------------------ audit
    def _log_or_fail() -> Any:
        if gw.audit_log is None:
            raise NotFoundError("this gateway has no audit log to review")
        return gw.audit_log

    @router.get("/audit", name="console_audit")
    @html
    async def audit(request: Request) -> Response:
        session = con.require(request, Page.AUDIT)
        log = _log_or_fail()
        query = _query(request)
        flt, problems = auditview.AuditFilter.from_query(query)
        try:
            page = max(0, min(int(query.get("page", "0") or 0), 100_000))
        except ValueError:
            page = 0
        view = await run_in_threadpool(auditview.scan, log, flt, page=page)
        base = flt.query()
        return con.page(
            "audit.html",
            session=session,
            active="audit",
            view=view,
            flt=flt,
            problems=problems,
            page=page,
            roles=auditview.ROLES,
            outcomes=auditview.OUTCOMES,
            prev_link="?" + urlencode({**base, "page": page - 1}) if page > 0 else None,
            next_link="?" + urlencode({**base, "page": page + 1}) if view.has_next else None,
            export_query=urlencode(base),
            outcome=session.last_outcome,
            fmt_time=_fmt_time,
            # Public: what `fedvault audit verify --key` needs (compare it with
            # `fedvault audit public-key` on the gateway host: trust comes out of band).
            verifier_key=log.signer.verifier.line,
            damage=log.integrity.problem(),
        )

    @router.get("/audit/entries/{index}", name="console_audit_entry")
    @html
    async def audit_entry(
        request: Request, index: Annotated[int, PathParam(ge=0, le=2**62)]
    ) -> Response:
        session = con.require(request, Page.AUDIT)
        log = _log_or_fail()
        rows = await run_in_threadpool(log.entries, index, index + 1) if index <= log.size() else []
        if not rows:
            raise NotFoundError(f"the audit log has no entry {index}")
        entry = rows[0][1]
        try:
            record = decode_entry(entry)
            problem = None
        except InvalidEntry as exc:
            record, problem = None, str(exc)
        check = await run_in_threadpool(auditview.check_inclusion, log, index, entry)
        fields = sorted(record.to_json_dict().items()) if record else []
        return con.page(
            "audit_entry.html",
            session=session,
            active="audit",
            index=index,
            fields=fields,
            problem=problem,
            leaf=auditview.AuditRow(index, entry, record).leaf_hash,
            check=check,
        )

    @router.post("/audit/verify", name="console_audit_verify")
    @html
    async def audit_verify(request: Request) -> Response:
        form = await con.form(request)
        session = con.require_post(request, form, Page.AUDIT)
        log = _log_or_fail()

        def run() -> None:
            with session.lock:  # one verification per session at a time
                outcome, state = auditview.verify(log, session.verified, time.time())
                session.verified, session.last_outcome = state, outcome

        await run_in_threadpool(run)
        if request.headers.get("x-console-fragment") == "verify":
            return con.page("verify_panel.html", session=session, outcome=session.last_outcome)
        return _secure(RedirectResponse(PREFIX + "/audit#verify", status_code=303))

    @router.get("/audit/export.{fmt}", name="console_audit_export")
    @html
    async def audit_export(request: Request, fmt: str) -> Response:
        con.require(request, Page.AUDIT)
        if fmt not in ("jsonl", "csv"):
            raise NotFoundError("export as .jsonl or .csv")
        log = _log_or_fail()
        flt, _ = auditview.AuditFilter.from_query(_query(request))
        if fmt == "jsonl":
            body = await run_in_threadpool(auditview.export_jsonl, log, flt)
            media = "application/jsonl; charset=utf-8"
        else:
            body = await run_in_threadpool(auditview.export_csv, log, flt)
            media = "text/csv; charset=utf-8"
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        response = Response(body, media_type=media)
        response.headers["Content-Disposition"] = (
            f'attachment; filename="fedvault-audit-{stamp}.{fmt}"'
        )
        return _secure(response)

    # ---------------------------------------------------------------- budgets
    @router.get("/budgets", name="console_budgets")
    @html
    async def budgets(request: Request) -> Response:
        session = con.require(request, Page.BUDGETS)
        runs = await run_in_threadpool(load_budgets, gw.open_federation, session.user)
        return con.page("budgets.html", session=session, active="budgets", runs=runs)

    # ----------------------------------------------------------------- models
    @router.get("/models", name="console_models")
    @html
    async def models(request: Request) -> Response:
        session = con.require(request, Page.MODELS)
        entries = await run_in_threadpool(
            load_models, gw.open_federation, gw.service.repository, session.user
        )
        return con.page(
            "models.html",
            session=session,
            active="models",
            models=entries,
            may_rollback=session.user.may(Page.ROLLBACK),
            notice=request.query_params.get("rolled_back"),
        )

    @router.post("/models/{name}/rollback", name="console_rollback")
    @html
    async def rollback(
        request: Request, name: Annotated[str, PathParam(min_length=1, max_length=200)]
    ) -> Response:
        form = await con.form(request)
        event = _event(request)
        version = form.get("version") or None
        if event is not None:
            event.model, event.version = name, version
        session = con.require_post(request, form, Page.ROLLBACK)
        if version is not None and len(version) > 32:
            raise InvalidRequestError("version too long")
        chosen = await run_in_threadpool(
            gw.service.repository.rollback, name, version, actor=f"key:{session.user.key_id}"
        )
        if event is not None:
            event.version = chosen
        target = PREFIX + "/models?" + urlencode({"rolled_back": f"{name} → v{chosen}"})
        return _secure(RedirectResponse(target, status_code=303))

    # ------------------------------------------------------------- monitoring
    @router.get("/monitoring", name="console_monitoring")
    @html
    async def monitoring(request: Request) -> Response:
        session = con.require(request, Page.MONITORING)
        glances, span = await run_in_threadpool(con.monitor.glance)
        return con.page(
            "monitoring.html",
            session=session,
            active="monitoring",
            glances=glances,
            drift_rows=[(g.model, *d) for g in glances for d in g.drift],
            span=span,
            audit_healthy=gw.audit.healthy,
            thresholds={"psi": (PSI_WARN, PSI_ALERT), "ks": (KS_WARN, KS_ALERT)},
        )

    return router


def _fmt_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
