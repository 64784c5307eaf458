"""`clipcli serve`: a local search page and JSON API over saved embeddings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from clipcli.commands import options as opt
from clipcli.images.limits import DEFAULT_MAX_MEGAPIXELS

if TYPE_CHECKING:
    from clipcli.models import ModelOptions
    from clipcli.serve.server import Ready

Sources = Annotated[
    list[str],
    typer.Argument(metavar="EMB...", help="Embeddings written by embed (Parquet files or folders, NPY files)."),
]
Port = Annotated[int, typer.Option(min=0, max=65535, metavar="PORT", help="The port to listen on (0: any free one).")]
Host = Annotated[
    str,
    typer.Option(
        metavar="HOST",
        help="The address to listen on. Anything but a loopback address (127.0.0.1, ::1, localhost) lets other "
        "machines in: a warning is printed and every request needs the token.",
    ),
]
Token = Annotated[
    str | None,
    typer.Option(
        metavar="TOKEN",
        envvar="CLIPCLI_SERVE_TOKEN",
        help="The token requests must carry (?token=, a cookie, or 'Authorization: Bearer'). Default off "
        "loopback: a random one, printed once.",
    ),
]
NoIndex = Annotated[bool, typer.Option("--no-index", help="Scan every row exactly, even where an index exists.")]
ThumbCache = Annotated[
    str | None,
    typer.Option(metavar="DIR", help="Where thumbnails are kept. Default: clipcli-thumbs in clipcli's cache."),
]
ThumbCacheMb = Annotated[int, typer.Option(min=1, metavar="MB", help="The most the thumbnails may take on disk.")]
MaxUploadMb = Annotated[
    float, typer.Option(min=0.001, metavar="MB", help="The largest picture one may drop on the page.")
]


@opt.grouped(models=opt.MODEL_OPTIONS)
def serve(
    sources: Sources,
    port: Port = 8765,
    host: Host = "127.0.0.1",
    token: Token = None,
    no_index: NoIndex = False,
    thumb_cache: ThumbCache = None,
    thumb_cache_mb: ThumbCacheMb = 512,
    max_upload_mb: MaxUploadMb = 20.0,
    max_megapixels: opt.MaxMegapixels = DEFAULT_MAX_MEGAPIXELS,
    *,
    models: ModelOptions,
) -> None:
    """Search saved embeddings in a browser: a search page and its JSON API (/docs), until Ctrl-C.

    The model is the one the first dataset was made with unless --model says otherwise; each
    dataset's index is used when it is current. Only the datasets' own images are ever served.
    """
    from clipcli.commands.console import say
    from clipcli.serve.server import ServeHooks, ServeRequest, run_serve

    request = ServeRequest(
        sources,
        host,
        port,
        token,
        no_index,
        thumb_cache,
        thumb_cache_mb << 20,
        int(max_upload_mb * (1 << 20)),
        opt.max_pixels(max_megapixels),
    )
    run_serve(request, models, ServeHooks(opt.load, _ready, say))
    say("stopped")


def _ready(ready: Ready) -> None:
    from clipcli.commands.console import say

    if ready.exposed:
        say("warning: listening beyond this machine's loopback address: anyone who can reach it and has the token")
        say("can see every image of these datasets; prefer the default --host 127.0.0.1 and an SSH tunnel")
    plural = "s" * (ready.datasets != 1)
    say(f"serving {ready.images:,} images of {ready.datasets} dataset{plural} at {ready.url} (Ctrl-C to stop)")
