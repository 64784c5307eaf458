"""The web app: :func:`create_app` builds it (tests build it in-process, ``serve`` runs it with uvicorn).

Routes are thin: each reads its parameters and calls :class:`~clipcli.serve.searching.Searcher`, the
:class:`~clipcli.serve.catalog.Catalog` or the thumbnail cache. The page (``page/``: plain HTML, CSS and
JavaScript, nothing fetched from elsewhere) uses the same JSON API a script would; FastAPI documents it
at ``/docs`` and ``/openapi.json``.

Safety, in one place: with a token (required off loopback) every request must carry it (the page's URL
``?token=`` sets a cookie); without one, requests must name a loopback host (a web page elsewhere cannot
reach the server through DNS rebinding). A request a browser sends for another site's page (its
``Origin`` is not this server's own: a form or a ``fetch`` posting a picture to the loopback address) is
refused whatever its host. Files are served only through :meth:`Catalog.file_of`.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field
from datetime import date
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from clipcli import __version__
from clipcli.errors import ClipCliError
from clipcli.images.limits import DEFAULT_MAX_PIXELS
from clipcli.serve import schemas
from clipcli.serve.catalog import Catalog, Unavailable
from clipcli.serve.searching import MAX_PAGE_SIZE, Cutoff, Search, Searcher
from clipcli.serve.thumbcache import ThumbCache
from clipcli.serve.uploads import TooLarge, Uploads

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from clipcli.models import LoadedModel

PAGE_FILES = {
    "/": ("index.html", "text/html"),
    "/app.js": ("app.js", "text/javascript"),
    "/style.css": ("style.css", "text/css"),
}
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "[::1]"}
TOKEN_COOKIE = "clipcli_token"
THUMB_SIZES = (128, 256, 512)


@dataclass
class Served:
    """What the app serves: the datasets and model, and the limits it keeps."""

    lm: LoadedModel
    catalog: Catalog
    token: str | None = None
    thumbs: ThumbCache = field(default_factory=ThumbCache)
    max_upload_bytes: int = 20 << 20
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # None: no limit


def create_app(served: Served) -> FastAPI:
    app = FastAPI(
        title="clipcli serve",
        version=__version__,
        description="Search images by meaning over embeddings saved by `clipcli embed`.",
    )
    model_lock = threading.Lock()  # one forward pass at a time: torch spreads each over every core
    uploads = Uploads(served.lm, model_lock, served.max_upload_bytes, served.max_pixels)
    searcher = Searcher(served.lm, served.catalog, uploads.get, model_lock)
    app.router.add_event_handler("shutdown", uploads.close)
    _guard(app, served.token)
    _errors(app)
    _page(app)
    _api(app, served, searcher, uploads)
    return app


def _guard(app: FastAPI, token: str | None) -> None:
    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.url.netloc:  # scheme: a TLS proxy's
            return JSONResponse({"detail": "this server answers its own page only, not other sites'"}, 403)
        if token is None:
            if (request.url.hostname or "") not in LOOPBACK_NAMES:
                return JSONResponse({"detail": "this server answers on its loopback address only"}, 403)
        else:
            given = request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE) or ""
            bearer = request.headers.get("authorization", "")
            if bearer.lower().startswith("bearer "):
                given = bearer[7:].strip()
            if not secrets.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"detail": "a token is needed: open the URL the server printed"}, 401)
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        if token is not None and request.query_params.get("token"):
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response


def _errors(app: FastAPI) -> None:
    def answer(status: int) -> Callable[[Request, Exception], Response]:
        def handler(request: Request, e: Exception) -> Response:
            return JSONResponse({"detail": str(e)}, status)

        return handler

    app.add_exception_handler(TooLarge, answer(413))
    app.add_exception_handler(Unavailable, answer(503))
    app.add_exception_handler(ClipCliError, answer(400))


def _page(app: FastAPI) -> None:
    files = {
        route: (resources.files("clipcli.serve").joinpath("page", name).read_bytes(), kind)
        for route, (name, kind) in PAGE_FILES.items()
    }

    def serve(route: str) -> Callable[[], Response]:
        body, kind = files[route]

        def page() -> Response:
            return Response(
                body, media_type=kind, headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"}
            )

        return page

    for route in files:
        app.add_api_route(route, serve(route), methods=["GET"], include_in_schema=False)


Page = Annotated[int, Query(ge=1, description="1 for the best results.")]
PageSize = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)]
Where = Annotated[str | None, Query(description="A filter over the dataset's columns, as `rank --where` (DuckDB SQL).")]
After = Annotated[date | None, Query(description="Taken (else modified) on or after this day.")]
Before = Annotated[date | None, Query(description="Taken (else modified) on or before this day.")]
MinScore = Annotated[float | None, Query(description="Drop results scoring below this.", allow_inf_nan=False)]
CutoffQ = Annotated[Cutoff, Query(description="auto: keep only results that stand out from the dataset's scores.")]


class Narrowing:
    """The query parameters that narrow and page the results, shared by /api/search and /api/similar, as
    keywords of :class:`clipcli.serve.searching.Search`."""

    def __init__(
        self,
        where: Where = None,
        after: After = None,
        before: Before = None,
        min_score: MinScore = None,
        cutoff: CutoffQ = "none",
        page: Page = 1,
        page_size: PageSize = 24,
    ) -> None:
        self.keywords: dict[str, Any] = {
            "where": where,
            "after": after,
            "before": before,
            "min_score": min_score,
            "cutoff": cutoff,
            "page": page,
            "page_size": page_size,
        }


Narrowed = Annotated[Narrowing, Depends()]


def thumb_url(path: str) -> str:
    return f"/api/thumb?path={quote(path, safe='')}"


def _api(app: FastAPI, served: Served, searcher: Searcher, uploads: Uploads) -> None:
    catalog = served.catalog
    problems: dict[int | str, dict[str, Any]] = {
        400: {"model": schemas.Problem, "description": "A malformed query or filter (the detail says where)."},
        503: {"model": schemas.Problem, "description": "A dataset changed while serving and cannot be read now."},
    }

    def respond(s: Search) -> schemas.SearchResponse:
        found = searcher.search(s)
        results = [
            schemas.Result(path=h.path, row=h.row, score=round(h.score, 6), dataset=h.dataset, thumb=thumb_url(h.row))
            for h in found.hits
        ]
        return schemas.SearchResponse(
            results=results, page=s.page, page_size=s.page_size, more=found.more, cutoff=found.cutoff, notes=found.notes
        )

    @app.get("/api/info", response_model=schemas.Info)
    def info() -> schemas.Info:
        """The model and the datasets served."""
        datasets = [
            schemas.Dataset(
                source=str(d.source),
                rows=d.size,
                index=d.index is not None,
                columns=sorted(d.columns),
                date_column="taken" if "taken" in d.columns else "mtime" if "mtime" in d.columns else None,
            )
            for d in catalog.current()
        ]
        return schemas.Info(model=served.lm.name, datasets=datasets, max_upload_bytes=served.max_upload_bytes)

    @app.get("/api/search", response_model=schemas.SearchResponse, responses=problems)
    def search(
        narrowed: Narrowed,
        q: Annotated[str, Query(description='The query: "beach" - "people", 2:dog + ./ref.jpg (see the docs).')] = "",
        negative: Annotated[list[str] | None, Query(description="Texts to subtract, as rank --negative.")] = None,
        upload: Annotated[str | None, Query(description="An uploaded picture's id (POST /api/upload).")] = None,
    ) -> schemas.SearchResponse:
        """The best images for a query, a page at a time."""
        return respond(Search(q, tuple(negative or ()), upload, None, **narrowed.keywords))

    @app.get("/api/similar", response_model=schemas.SearchResponse, responses=problems)
    def similar(
        path: Annotated[str, Query(description="A result's path: images like it, itself left out.")],
        narrowed: Narrowed,
    ) -> schemas.SearchResponse:
        """More like this: the images nearest to one of the datasets' images."""
        return respond(Search("", (), None, path, **narrowed.keywords))

    @app.post(
        "/api/upload",
        response_model=schemas.UploadResponse,
        responses={413: {"model": schemas.Problem, "description": "Over the size limit."}, 400: problems[400]},
        openapi_extra={
            "requestBody": {
                "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}},
                "required": True,
            }
        },
    )
    async def upload(request: Request) -> schemas.UploadResponse:
        """A picture to search by (the request's body is the image file); its id goes to /api/search."""
        limit = served.max_upload_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise uploads.too_large(int(declared))
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise uploads.too_large(len(data))
        return schemas.UploadResponse(id=await run_in_threadpool(uploads.add, bytes(data)))

    @app.get(
        "/api/thumb",
        responses={
            200: {"content": {"image/jpeg": {}}},
            400: {"model": schemas.Problem, "description": "A size not offered."},
            404: {"model": schemas.Problem, "description": "Not an image served."},
        },
        response_class=Response,
    )
    def thumb(
        request: Request,
        path: Annotated[str, Query(description="A result's path, exactly as the API gave it.")] = "",
        size: Annotated[int, Query(description=f"The longer side, one of {THUMB_SIZES}.")] = 256,
    ) -> Response:
        """A result's thumbnail (JPEG, upright); only the datasets' own images are served."""
        if size not in THUMB_SIZES:
            return JSONResponse({"detail": f"size must be one of {', '.join(map(str, THUMB_SIZES))}, not {size}"}, 400)
        found = catalog.file_of(path)
        if found is None:
            return JSONResponse({"detail": "not found"}, 404)
        try:
            data, etag = served.thumbs.get(found[0], size, found[1])
        except Exception:  # a file that is no picture Pillow can read, however Pillow fails
            return JSONResponse({"detail": "not found"}, 404)
        headers = {"ETag": f'"{etag}"', "Cache-Control": "private, max-age=86400"}
        if request.headers.get("if-none-match") == headers["ETag"]:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type="image/jpeg", headers=headers)

    @app.get("/api/dedup", response_model=schemas.DedupResponse, responses=problems)
    def dedup(
        threshold: Annotated[
            float, Query(ge=-1.0, le=1.0, description="Cosine similarity at which two images are copies.")
        ] = 0.9,
        page: Page = 1,
        page_size: PageSize = 24,
    ) -> schemas.DedupResponse:
        """Groups of near-duplicates (as `clipcli dedup`), a page of groups at a time."""
        found = searcher.duplicates(threshold)
        start = (page - 1) * page_size
        groups = [
            schemas.Group(
                group=number,
                dataset=dataset,
                members=[
                    schemas.Member(
                        path=m.path,
                        similarity=round(m.similarity, 6),
                        bytes=m.bytes if m.bytes >= 0 else None,
                        thumb=thumb_url(m.path),
                    )
                    for m in members
                ],
            )
            for number, (dataset, members) in enumerate(found[start : start + page_size], start + 1)
        ]
        return schemas.DedupResponse(
            groups=groups,
            total=len(found),
            page=page,
            page_size=page_size,
            more=len(found) > start + page_size,
            threshold=threshold,
        )
