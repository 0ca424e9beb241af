"""The console's pages under ``/console``: sign-in, the dining index, terminals and alarms, rollouts,
subsidy batches, members and statements.

Each handler reads the session (gateway.console.session), calls the public REST API with the
session's token (gateway.console.api) and renders a Jinja2 template. The tenant is always the
session's: no console route takes a tenant, and every id a route takes (an alarm, a member, a card,
a batch) goes into a REST path under the session's tenant, where another tenant's id is 404 as one
that does not exist. A refusal of the API is shown as the page's message with the API's status; a
token that expired or was revoked ends the session and asks to sign in again.

Pages work without JavaScript (forms post and redirect back); htmx (vendored) only refreshes the
dining chart and a batch's progress in place.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Form, Path, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.templating import Jinja2Templates
from starlette.datastructures import FormData, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.auth import (DATA_READ, DEVICES_ADMIN, LEDGER_ADMIN, MEMBERS_READ, MEMBERS_WRITE, STATEMENTS_READ,
                          known_scopes)
from gateway.console.api import ApiProblem, RestApi, rest_api, segment
from gateway.console.chart import canteens, dining_svg
from gateway.console.session import (CSRF_FIELD, CSRF_HEADER, ConsoleSession, SessionBox, clear_session,
                                     clear_sign_in_csrf, new_csrf_token, same_token, session_from, set_session,
                                     set_sign_in_csrf, sign_in_csrf)
from gateway.problems import ProblemError

HERE = FilePath(__file__).parent
STATIC_DIR = HERE / "static"
HTMX_VERSION = "2.0.11"
# The only files served from /console/static: nothing else on disk is reachable.
STATIC_FILES = {
    "console.css": "text/css; charset=utf-8",
    "vendor/htmx.min.js": "text/javascript; charset=utf-8",
}
# How often the live parts refresh in place.
DINING_REFRESH_S = 3
BATCH_REFRESH_S = 1
DINING_WINDOW_S = 15 * 60
# Pages show one page of the API's answer: enough for a console, bounded for the server.
DEVICES_PAGE_SIZE = 200
ALARMS_PAGE_SIZE = 200
ROLLOUTS_PAGE_SIZE = 10
MEMBERS_PAGE_SIZE = 50
FAILED_ROWS_PAGE_SIZE = 500
MAX_FIELD_CHARS = 200
MAX_SECRET_CHARS = 256
# Ids as the REST API knows them (UUIDs, card UIDs in hex); anything else is 404 before the API is asked.
ID_PATTERN = r"^[A-Za-z0-9-]{1,64}$"
CSV_MEDIA_TYPE = "text/csv"
# What every console answer says to the browser: no framing, no foreign scripts or styles, no
# caching of pages that show a tenant's data, no referrer leaving the console.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
# The pages, in the order of the navigation, each with the scope its data needs.
PAGES = [
    ("dining", "Dining index", "/console/dining", DATA_READ),
    ("terminals", "Terminals", "/console/terminals", DEVICES_ADMIN),
    ("rollouts", "Rollouts", "/console/rollouts", DEVICES_ADMIN),
    ("batches", "Subsidy batches", "/console/subsidy-batches", LEDGER_ADMIN),
    ("members", "Members", "/console/members", MEMBERS_READ),
    ("statements", "Statements", "/console/statements", STATEMENTS_READ),
]
# Messages a redirect may ask a page to show (by key: a URL never carries text into the page).
NOTICES = {
    "frozen": "The member is frozen: every card, code and face of theirs is refused from now on.",
    "card-lost": "The card is reported lost and goes on the blacklist of every device.",
    "acknowledged": "The alarm is acknowledged.",
    "cleared": "The alarm is cleared.",
    "signed-out": "You are signed out.",
}

templates = Jinja2Templates(directory=str(HERE / "templates"))
router = APIRouter(prefix="/console", include_in_schema=False)


class SignInRequired(Exception):
    """No session, or its token no longer opens the API."""


def _box(request: Request) -> SessionBox:
    box = getattr(request.app.state, "console_box", None)
    if box is None:
        box = SessionBox(token_secret=request.app.state.gateway.settings.token_secret.get_secret_value())
        request.app.state.console_box = box
    return box


def current_session(request: Request) -> ConsoleSession:
    session = session_from(_box(request), request)
    if session is None:
        raise SignInRequired()
    return session


Session = Annotated[ConsoleSession, Depends(current_session)]


async def checked_session(request: Request, session: Session) -> ConsoleSession:
    """The session of a POST whose CSRF token (form field or header) is the session's; else 403."""
    offered = request.headers.get(CSRF_HEADER)
    if offered is None:
        form = await request.form()
        value = form.get(CSRF_FIELD)
        offered = value if isinstance(value, str) else None
    if not same_token(session.csrf_token, offered):
        raise ProblemError(status=403, reason="CSRF_TOKEN_INVALID",
                           detail="the form's CSRF token is missing or wrong; reload the page and try again")
    return session


PostSession = Annotated[ConsoleSession, Depends(checked_session)]
IdPath = Annotated[str, Path(pattern=ID_PATTERN)]


async def _api(request: Request, session: Session) -> AsyncIterator[RestApi]:
    async with rest_api(request, token=session.access_token) as api:
        yield api


Api = Annotated[RestApi, Depends(_api)]


def _tenant_path(session: ConsoleSession, *parts: str) -> str:
    return "/v1/tenants/" + "/".join([segment(session.tenant_id), *(segment(p) for p in parts)])


def render(request: Request, template: str, *, session: ConsoleSession | None, page: str = "",
           status_code: int = 200, **context: Any) -> HTMLResponse:
    notice = NOTICES.get(request.query_params.get("notice", ""))
    nav = [(key, title, href) for key, title, href, scope in PAGES if session is None or session.holds(scope)]
    response = templates.TemplateResponse(request, template, {
        "session": session, "page": page, "nav": nav, "notice": notice, "csrf_field": CSRF_FIELD,
        "csrf_header": CSRF_HEADER, "htmx_version": HTMX_VERSION, **context}, status_code=status_code)
    return response


def _back(url: str, *, notice: str) -> RedirectResponse:
    joiner = "&" if "?" in url else "?"
    return RedirectResponse(f"{url}{joiner}notice={notice}", status_code=303)


# --- static files and sign-in ---------------------------------------------------------------------------


@router.get("/static/{name:path}")
async def static_file(name: str) -> Response:
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise ProblemError(status=404, reason="NOT_FOUND", detail="no such file")
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers={"Cache-Control": "public, max-age=300"})


@router.get("")
async def console_home(request: Request) -> Response:
    session = session_from(_box(request), request)
    if session is None:
        return RedirectResponse("/console/sign-in", status_code=303)
    first = next((href for _, _, href, scope in PAGES if session.holds(scope)), None)
    if first is None:
        needed = " or ".join(sorted({scope for *_, scope in PAGES}))
        return render(request, "error.html", session=session, status_code=403, problem=ApiProblem(
            status=403, reason="INSUFFICIENT_SCOPE", title="Nothing to show", detail="", scope=needed))
    return RedirectResponse(first, status_code=303)


def _sign_in_form(request: Request, *, status_code: int = 200, error: str = "", tenant_id: str = "",
                  client_id: str = "") -> HTMLResponse:
    token = new_csrf_token()
    response = render(request, "sign_in.html", session=None, status_code=status_code, error=error,
                      csrf_token=token, tenant_id=tenant_id, client_id=client_id)
    set_sign_in_csrf(response, _box(request), request, token)
    return response


@router.get("/sign-in")
async def sign_in_page(request: Request) -> Response:
    return _sign_in_form(request)


@router.post("/sign-in")
async def sign_in(
    request: Request,
    tenant_id: Annotated[str, Form(max_length=MAX_FIELD_CHARS)] = "",
    client_id: Annotated[str, Form(max_length=MAX_FIELD_CHARS)] = "",
    client_secret: Annotated[str, Form(max_length=MAX_SECRET_CHARS)] = "",
    csrf_token: Annotated[str, Form(alias=CSRF_FIELD, max_length=MAX_FIELD_CHARS)] = "",
) -> Response:
    """Trades the client's id and secret for a token at the gateway's own token endpoint."""
    expected = sign_in_csrf(_box(request), request)
    if expected is None or not same_token(expected, csrf_token):
        raise ProblemError(status=403, reason="CSRF_TOKEN_INVALID",
                           detail="the sign-in form's CSRF token is missing, wrong or expired; reload the page")
    tenant_id, client_id = tenant_id.strip(), client_id.strip()
    if not (tenant_id and client_id and client_secret):
        return _sign_in_form(request, status_code=400, error="Enter the tenant, the client id and its secret.",
                             tenant_id=tenant_id, client_id=client_id)
    async with rest_api(request, token=None) as api:
        try:
            token = await api.post("/v1/oauth/token", data={
                "grant_type": "client_credentials", "tenant_id": tenant_id, "client_id": client_id,
                "client_secret": client_secret})
        except ApiProblem as problem:
            message = ("Too many sign-in attempts; wait a little and try again." if problem.status == 429
                       else "These credentials do not open this tenant.")
            return _sign_in_form(request, status_code=problem.status if problem.status in (401, 429) else 400,
                                 error=message, tenant_id=tenant_id, client_id=client_id)
    session = ConsoleSession(access_token=token["access_token"], tenant_id=tenant_id, client_id=client_id,
                             scopes=known_scopes(str(token.get("scope", "")).split()), csrf_token=new_csrf_token(),
                             expires_at_s=int(time.time()) + int(token["expires_in"]))
    response = RedirectResponse("/console", status_code=303)
    set_session(response, _box(request), request, session)
    clear_sign_in_csrf(response, request)
    return response


@router.post("/sign-out")
async def sign_out(request: Request, _session: PostSession) -> Response:
    response = RedirectResponse("/console/sign-in?notice=signed-out", status_code=303)
    clear_session(response, request)
    return response


# --- data:read: the dining index --------------------------------------------------------------------


async def _dining(api: RestApi, session: ConsoleSession) -> dict[str, Any]:
    index = await api.get(_tenant_path(session, "dining-index"), params={"window_s": DINING_WINDOW_S})
    rows = canteens(index)
    return {"index": index, "canteens": rows, "chart": dining_svg(rows, title_id="dining-title"),
            "refresh_s": DINING_REFRESH_S}


@router.get("/dining")
async def dining_page(request: Request, session: Session, api: Api) -> Response:
    return render(request, "dining.html", session=session, page="dining", **await _dining(api, session))


@router.get("/dining/chart")
async def dining_chart(request: Request, session: Session, api: Api) -> Response:
    return render(request, "_dining_chart.html", session=session, **await _dining(api, session))


# --- devices:admin: terminals, alarms, rollouts ---------------------------------------------------------


@router.get("/terminals")
async def terminals_page(request: Request, session: Session, api: Api) -> Response:
    devices, alarms = await asyncio.gather(
        api.get(_tenant_path(session, "devices"), params={"page_size": DEVICES_PAGE_SIZE}),
        api.get(_tenant_path(session, "alarms"), params={"page_size": ALARMS_PAGE_SIZE}))
    names = {d["device_id"]: d["name"] for d in devices["devices"]}
    return render(request, "terminals.html", session=session, page="terminals", devices=devices["devices"],
                  alarms=alarms["alarms"], device_names=names)


@router.post("/alarms/{alarm_id}/acknowledge")
async def acknowledge_alarm(alarm_id: IdPath, session: PostSession, api: Api) -> Response:
    await api.post(_tenant_path(session, "alarms", alarm_id, "acknowledge"))
    return _back("/console/terminals", notice="acknowledged")


@router.post("/alarms/{alarm_id}/clear")
async def clear_alarm(alarm_id: IdPath, session: PostSession, api: Api) -> Response:
    await api.post(_tenant_path(session, "alarms", alarm_id, "clear"))
    return _back("/console/terminals", notice="cleared")


def _stages(rollout: dict[str, Any]) -> list[dict[str, Any]]:
    """Per stage: its size and how many of its devices are at each step."""
    stages = [{"number": i + 1, "size": size, "steps": {}} for i, size in enumerate(rollout["stage_sizes"])]
    for device in rollout.get("devices", []):
        if 0 <= device["stage"] < len(stages):
            steps = stages[device["stage"]]["steps"]
            steps[device["step"]] = steps.get(device["step"], 0) + 1
    return stages


@router.get("/rollouts")
async def rollouts_page(request: Request, session: Session, api: Api) -> Response:
    page = await api.get(_tenant_path(session, "rollouts"), params={"page_size": ROLLOUTS_PAGE_SIZE})
    # The list leaves the devices out; each rollout read in full says where its stages are.
    full = await asyncio.gather(*(api.get(_tenant_path(session, "rollouts", r["rollout_id"]))
                                  for r in page["rollouts"]))
    return render(request, "rollouts.html", session=session, page="rollouts",
                  rollouts=[{**r, "stages": _stages(r)} for r in full])


# --- ledger:admin: subsidy batches --------------------------------------------------------------------


@router.get("/subsidy-batches")
async def batches_page(request: Request, session: Session) -> Response:
    return render(request, "batches.html", session=session, page="batches", error=None, form={})


@router.post("/subsidy-batches")
async def upload_batch(
    request: Request,
    session: PostSession,
    api: Api,
    file: UploadFile,
    bill_number: Annotated[str, Form(max_length=MAX_FIELD_CHARS)] = "",
    purse_kind: Annotated[str, Form(max_length=MAX_FIELD_CHARS)] = "subsidy",
    ref: Annotated[str, Form(max_length=MAX_FIELD_CHARS)] = "",
) -> Response:
    """The CSV goes to ``POST …/subsidy-batches`` as it is (text/csv), then the batch's page follows it."""
    content = await file.read()
    form = {"bill_number": bill_number, "purse_kind": purse_kind, "ref": ref}
    try:
        started = await api.post(_tenant_path(session, "subsidy-batches"), content=content,
                                 headers={"Content-Type": CSV_MEDIA_TYPE}, params=form)
    except ApiProblem as problem:
        if problem.status in (401, 403, 404):
            raise
        return render(request, "batches.html", session=session, page="batches", error=problem, form=form,
                      status_code=problem.status)
    return RedirectResponse(f"/console/subsidy-batches/{segment(started['batch']['batch_id'])}", status_code=303)


async def _batch(api: RestApi, session: ConsoleSession, batch_id: str) -> dict[str, Any]:
    batch = await api.get(_tenant_path(session, "subsidy-batches", batch_id))
    failed: list[dict[str, Any]] = []
    if batch["status"] == "done" and batch["failed_rows"]:
        failed = (await api.get(_tenant_path(session, "subsidy-batches", batch_id, "rows"),
                                params={"status": "failed", "page_size": FAILED_ROWS_PAGE_SIZE}))["rows"]
    percent = 100 if not batch["total_rows"] else round(100 * batch["done_rows"] / batch["total_rows"])
    return {"batch": batch, "failed": failed, "percent": percent, "refresh_s": BATCH_REFRESH_S}


@router.get("/subsidy-batches/{batch_id}")
async def batch_page(request: Request, batch_id: IdPath, session: Session, api: Api) -> Response:
    return render(request, "batch.html", session=session, page="batches", **await _batch(api, session, batch_id))


@router.get("/subsidy-batches/{batch_id}/progress")
async def batch_progress(request: Request, batch_id: IdPath, session: Session, api: Api) -> Response:
    return render(request, "_batch_progress.html", session=session, **await _batch(api, session, batch_id))


# --- members:read, members:write: members -------------------------------------------------------------


@router.get("/members")
async def members_page(request: Request, session: Session, api: Api,
                       q: Annotated[str, Query(max_length=MAX_FIELD_CHARS)] = "") -> Response:
    found = None
    if q.strip():
        found = (await api.get(_tenant_path(session, "members"),
                               params={"q": q.strip(), "page_size": MEMBERS_PAGE_SIZE}))["members"]
    return render(request, "members.html", session=session, page="members", q=q, members=found,
                  can_write=session.holds(MEMBERS_WRITE))


def _members_url(form: FormData) -> str:
    q = form.get("q")
    return "/console/members" + (f"?q={segment(q)}" if isinstance(q, str) and q else "")


@router.post("/members/{member_id}/freeze")
async def freeze_member(request: Request, member_id: IdPath, session: PostSession, api: Api) -> Response:
    await api.post(_tenant_path(session, "members", member_id, "freeze"),
                   json={"reason": f"console: frozen by {session.client_id}"})
    return _back(_members_url(await request.form()), notice="frozen")


@router.post("/members/{member_id}/cards/{card_uid}/report-lost")
async def report_card_lost(request: Request, member_id: IdPath, card_uid: IdPath, session: PostSession,
                           api: Api) -> Response:
    await api.post(_tenant_path(session, "members", member_id, "cards", card_uid, "report-lost"))
    return _back(_members_url(await request.form()), notice="card-lost")


# --- statements:read: statements ----------------------------------------------------------------------


def _statement_query(date: str, subject: str, subject_id: str, time_zone: str) -> dict[str, str]:
    key = "device_id" if subject == "device" else "merchant_account_id"
    return {"date": date, key: subject_id.strip(), "time_zone": time_zone}


StatementDate = Annotated[str, Query(max_length=10)]
StatementSubject = Annotated[str, Query(pattern="^(device|merchant)$")]
StatementSubjectId = Annotated[str, Query(max_length=MAX_FIELD_CHARS)]
StatementZone = Annotated[str, Query(max_length=64)]


@router.get("/statements")
async def statements_page(request: Request, session: Session, api: Api, date: StatementDate = "",
                          subject: StatementSubject = "device", subject_id: StatementSubjectId = "",
                          time_zone: StatementZone = "Asia/Shanghai") -> Response:
    totals, error = None, None
    query = _statement_query(date, subject, subject_id, time_zone)
    if date and subject_id:
        try:
            totals = await api.get(_tenant_path(session, "statements", "totals"), params=query)
        except ApiProblem as problem:
            if problem.status in (401, 403):
                raise
            error = problem
    return render(request, "statements.html", session=session, page="statements", date=date, subject=subject,
                  subject_id=subject_id, time_zone=time_zone, totals=totals, error=error,
                  status_code=error.status if error else 200)


@router.get("/statements/download")
async def download_statement(request: Request, session: Session, date: StatementDate, subject_id: StatementSubjectId,
                             subject: StatementSubject = "device",
                             time_zone: StatementZone = "Asia/Shanghai") -> Response:
    """The REST API's CSV, passed through as it streams; a refusal before the first byte is a page."""
    resources = AsyncExitStack()
    try:
        api = await resources.enter_async_context(rest_api(request, token=session.access_token))
        upstream = await resources.enter_async_context(api.stream(
            _tenant_path(session, "statements"), params=_statement_query(date, subject, subject_id, time_zone)))
    except BaseException:
        await resources.aclose()
        raise

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_bytes():
                yield chunk
        finally:
            await resources.aclose()

    return StreamingResponse(body(), media_type=upstream.headers.get("content-type", CSV_MEDIA_TYPE), headers={
        "Content-Disposition": upstream.headers.get("content-disposition", 'attachment; filename="statement.csv"')})


# --- answers: refusals, sign-in, headers --------------------------------------------------------------


def _is_htmx(request: Request) -> bool:
    return request.headers.get("HX-Request") == "true"


def _to_sign_in(request: Request) -> Response:
    if _is_htmx(request):
        response: Response = Response(status_code=401, headers={"HX-Redirect": "/console/sign-in"})
    else:
        response = RedirectResponse("/console/sign-in", status_code=303)
    clear_session(response, request)
    return response


async def _sign_in_required(request: Request, _exc: Exception) -> Response:
    return _to_sign_in(request)


async def _api_refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiProblem)
    if exc.status == 401:
        return _to_sign_in(request)
    session = session_from(_box(request), request)
    template = "_error.html" if _is_htmx(request) else "error.html"
    return render(request, template, session=session, problem=exc, status_code=exc.status)


def install(app: FastAPI) -> None:
    """The console's routes on the gateway's app, its refusals as pages, its headers on every answer."""
    app.include_router(router)
    app.add_exception_handler(SignInRequired, _sign_in_required)
    app.add_exception_handler(ApiProblem, _api_refused)

    app.add_middleware(ConsoleHeaders)


class ConsoleHeaders:
    """``SECURITY_HEADERS`` on every answer under /console (pages, fragments, refusals, files)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path == "/console" or path.startswith("/console/")):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    if name not in headers:
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


__all__ = ["install", "router"]
