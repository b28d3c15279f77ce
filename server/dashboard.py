"""``lungvl server dashboard``: a read-only coordinator page over the run registry (FastAPI + uvicorn).

Routes (all ``GET``; nothing is ever written)::

    /                          the page (server/static/dashboard.html + .js + .css)
    /static/<file>             its assets
    /api/runs                  :func:`server.status.runs_json` (the run list, newest first)
    /api/runs/latest           :func:`server.status.status_json` of the latest run
    /api/runs/{id}             :func:`server.status.status_json` of run ``id`` (``lungvl server status --json``)
    /plots/{id}/metrics.svg    global metrics per round (server-side SVG, :mod:`server.dashboard_svg`)
    /plots/{id}/epsilon.svg    client-level ε per round against the budget

Every request opens the registry read-only (:class:`~server.registry.Registry` with ``read_only=True``)
and closes it before answering, so the page works against a SQLite file that a simulation or a
deployment is writing (WAL readers never block the writer) and against PostgreSQL. The page polls
``/api/runs`` and the selected run every :data:`POLL_SECONDS` seconds.

Errors come back as JSON ``{"error": "<one line>"}``: 404 for an unknown run, 503 when the registry
cannot be read (file gone, corrupt, database down).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, TypeVar

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from lungvl_model.errors import CorruptStateError
from server.dashboard_svg import epsilon_chart, metric_charts
from server.registry import Registry, RegistryError
from server.status import runs_json, status_json

__all__ = ["POLL_SECONDS", "STATIC_DIR", "check_bind", "check_registry", "create_app", "is_loopback", "serve"]

STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
#: How often the page asks for fresh data.
POLL_SECONDS: Final = 2.0
T = TypeVar("T")
_NO_CACHE = {"Cache-Control": "no-store"}


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (``localhost``, ``127.x``, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def create_app(registry_url: str) -> FastAPI:
    """The dashboard's FastAPI application over one registry.

    Args:
        registry_url: a SQLAlchemy URL or a SQLite file path (opened read-only on every request).

    Returns:
        The application (serve it with :func:`serve`, or drive it with ``fastapi.testclient.TestClient``).
    """
    app = FastAPI(title="lungvl coordinator dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @contextmanager
    def registry() -> Iterator[Registry]:
        with Registry(registry_url, read_only=True) as reg:
            yield reg

    def answer(read: Callable[[Registry], T], wrap: Callable[[T], Response]) -> Response:
        try:
            with registry() as reg:
                value = read(reg)
        except RegistryError as err:
            return JSONResponse({"error": str(err)}, status_code=404, headers=_NO_CACHE)
        except (OSError, CorruptStateError) as err:
            return JSONResponse({"error": f"registry unreadable: {err}"}, status_code=503, headers=_NO_CACHE)
        except Exception as err:  # noqa: BLE001 - a database error (SQLAlchemy, driver): the page shows it
            if not type(err).__module__.startswith(("sqlalchemy", "psycopg", "sqlite3")):
                raise
            line = str(err).splitlines()[0] if str(err) else type(err).__name__
            return JSONResponse({"error": f"registry unreadable: {line}"}, status_code=503, headers=_NO_CACHE)
        return wrap(value)

    def as_json(doc: dict[str, Any] | None) -> Response:
        if doc is None:
            return JSONResponse({"error": "no runs recorded yet"}, status_code=404, headers=_NO_CACHE)
        return JSONResponse(doc, headers=_NO_CACHE)

    def as_svg(svg: str | None) -> Response:
        if svg is None:
            return JSONResponse({"error": "no runs recorded yet"}, status_code=404, headers=_NO_CACHE)
        return Response(svg, media_type="image/svg+xml", headers=_NO_CACHE)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "dashboard.html", headers=_NO_CACHE)

    @app.get("/api/runs")
    def api_runs() -> Response:
        return answer(runs_json, as_json)

    @app.get("/api/runs/latest")
    def api_latest() -> Response:
        return answer(lambda reg: status_json(reg, None), as_json)

    @app.get("/api/runs/{run_id}")
    def api_run(run_id: int) -> Response:
        return answer(lambda reg: status_json(reg, run_id), as_json)

    def plot(run_id: int, draw: Callable[[dict[str, Any]], str]) -> Response:
        def read(reg: Registry) -> str | None:
            doc = status_json(reg, run_id)
            return None if doc is None else draw(doc)

        return answer(read, as_svg)

    @app.get("/plots/{run_id}/metrics.svg")
    def plot_metrics(run_id: int) -> Response:
        return plot(run_id, metric_charts)

    @app.get("/plots/{run_id}/epsilon.svg")
    def plot_epsilon(run_id: int) -> Response:
        return plot(run_id, epsilon_chart)

    return app


def check_registry(registry_url: str) -> str:
    """Open the registry read-only once (a bad ``--db`` fails before the server starts); returns its URL.

    Raises:
        FileNotFoundError: a SQLite file that does not exist.
        CorruptStateError: not a lungvl registry, or unreadable.
    """
    with Registry(registry_url, read_only=True) as reg:
        reg.runs()
        return reg.url


def serve(
    registry_url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    log_level: str = "warning",
) -> None:
    """Serve the dashboard with uvicorn until Ctrl-C.

    Args:
        registry_url: the registry (SQLAlchemy URL or SQLite path).
        host: bind address; anything but loopback needs ``tls_cert`` and ``tls_key``.
        port: TCP port.
        tls_cert: PEM certificate (HTTPS when given with ``tls_key``).
        tls_key: its PEM private key.
        log_level: uvicorn's log level.

    Raises:
        ValueError: a non-loopback ``host`` without TLS, or only one of ``tls_cert``/``tls_key``.
        FileNotFoundError: a TLS file that does not exist.
    """
    import uvicorn

    check_bind(host, tls_cert, tls_key)
    uvicorn.run(
        create_app(registry_url),
        host=host,
        port=port,
        ssl_certfile=None if tls_cert is None else str(tls_cert),
        ssl_keyfile=None if tls_key is None else str(tls_key),
        log_level=log_level,
    )


def check_bind(host: str, tls_cert: Path | None, tls_key: Path | None) -> None:
    """Refuse to serve other machines without TLS.

    Raises:
        ValueError: a non-loopback ``host`` without TLS, or only one of ``tls_cert``/``tls_key``.
        FileNotFoundError: a TLS file that does not exist.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ValueError(f"give both --tls-cert and --tls-key (got cert={tls_cert}, key={tls_key})")
    if tls_cert is None and not is_loopback(host):
        raise ValueError(
            f"--host {host} is not loopback: the dashboard is only served to other machines over TLS "
            "(give --tls-cert/--tls-key, or --config server.toml for the coordinator's certificate)"
        )
    for path in (tls_cert, tls_key):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"TLS file {path} does not exist")
