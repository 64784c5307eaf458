"""``rank --html FILE``: the results as one static, self-contained page.

A grid of thumbnails (JPEG, EXIF-rotated, made by :func:`clipcli.images.thumbs.thumbnail_jpeg` and
inlined as ``data:`` URIs, so the page needs no other file), each with its score and its path, best
first; one section per query. A result whose file cannot be read (moved since it was embedded, say)
keeps its place with "no preview". Each picture links to its file, relative to the page. The page is
written atomically (whole or not at all), and never over one of the inputs.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import quote

from clipcli.images.limits import DEFAULT_MAX_PIXELS
from clipcli.search.rank import Hit

THUMB_SIZE = 256

STYLE = """
body{font-family:system-ui,sans-serif;margin:1rem;background:#fafafa;color:#222}
h1{font-size:1.2rem;margin:.2rem 0}h2{font-size:1.05rem;margin:1.2rem 0 .4rem}
p.note{color:#555;margin:.2rem 0 .8rem}
ol.grid{list-style:none;padding:0;margin:0;display:grid;gap:.75rem;
grid-template-columns:repeat(auto-fill,minmax(min(100%,170px),1fr))}
ol.grid li{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.4rem;overflow:hidden}
ol.grid a{display:block;color:inherit;text-decoration:none}ol.grid a:focus{outline:3px solid #06c}
ol.grid img{display:block;width:100%;height:160px;object-fit:contain;background:#eee}
.missing{height:160px;display:flex;align-items:center;justify-content:center;background:#eee;color:#777}
.score{font-weight:600;font-variant-numeric:tabular-nums}.path{font-size:.8rem;word-break:break-all;color:#444}
.text{font-size:.95rem;padding:.3rem 0}
"""


@dataclass(frozen=True)
class Section:
    """One query's results: ``title`` (the query as given) and its hits, best first; ``texts`` when the
    hits name texts (``--texts-file``) rather than files."""

    title: str
    hits: Sequence[Hit]
    texts: bool = False


def render_page(
    sections: Sequence[Section],
    page: Path,
    model: str,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    locate: Callable[[str], str] = str,
) -> str:
    """The page's HTML; thumbnails are made now (unreadable files get "no preview"); ``locate`` turns a
    result's name into the file it opens as from here (see :func:`dataset_locator`)."""
    total = sum(len(s.hits) for s in sections)
    title = sections[0].title if len(sections) == 1 else f"{len(sections)} queries"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>clipcli rank: {html.escape(title)}</title><style>{STYLE}</style></head><body><main>",
        f"<h1>clipcli rank: {html.escape(title)}</h1>",
        f'<p class="note">{total} result{"s" * (total != 1)}, best first; model {html.escape(model)}</p>',
    ]
    base = page.resolve().parent
    for section in sections:
        if len(sections) > 1:
            parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if not section.hits:
            parts.append('<p class="note">no result</p>')
            continue
        parts.append('<ol class="grid">')
        parts.extend(_card(hit, base, section.texts, max_pixels, locate) for hit in section.hits)
        parts.append("</ol>")
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


def _card(hit: Hit, base: Path, is_text: bool, max_pixels: int | None, locate: Callable[[str], str]) -> str:
    score = f'<div class="score">{hit.score:.4f}</div>'
    name = html.escape(hit.name)
    if is_text:
        return f'<li>{score}<div class="text">{name}</div></li>'
    file = locate(hit.name)
    picture = _thumbnail(file, max_pixels)
    alt = html.escape(os.path.basename(hit.name), quote=True)
    img = f'<img src="{picture}" alt="{alt}">' if picture else '<div class="missing">no preview</div>'
    href = html.escape(_href(file, base), quote=True)
    return f'<li><a href="{href}">{img}{score}<div class="path">{name}</div></a></li>'


def _thumbnail(name: str, max_pixels: int | None) -> str | None:
    """A data: URI of the file's thumbnail, or None when it cannot be read as an image."""
    from clipcli.images.containers import container_of
    from clipcli.images.thumbs import thumbnail_jpeg

    container = container_of(name)  # a video's frame or moment, a WebDataset sample
    member = None if container is None else name[len(container) + 1 :]
    file = name if container is None else container
    if not os.path.isfile(file):
        return None
    try:
        jpeg = thumbnail_jpeg(Path(file), THUMB_SIZE, max_pixels=max_pixels, member=member)
    except (OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def _href(name: str, base: Path) -> str:
    """The file's address relative to the page (absolute when on another drive); a member's keeps its
    ``#fragment`` (``clip.mp4#t=4.000,7.000`` opens a browser's player at that moment)."""
    from clipcli.images.containers import container_of

    container = container_of(name)
    fragment = "" if container is None else "#" + quote(name[len(container) + 1 :], safe="=,.")
    target = Path(name if container is None else container).resolve()
    try:
        return quote(os.path.relpath(target, base)) + fragment
    except ValueError:
        return target.as_uri() + fragment


def dataset_locator(sources: Sequence[str]) -> Callable[[str], str]:
    """Where a result's name opens from here: a relative path of saved embeddings is relative to the
    folder their Parquet metadata records (tried for each of ``sources`` in turn); other names as they are."""
    import pyarrow.parquet as pq

    from clipcli.store.parts import dataset_base

    bases: list[str] = []
    for source in sources:
        files = sorted(Path(source).glob("*.parquet")) if os.path.isdir(source) else [Path(source)]
        if not files or files[0].suffix.lower() not in (".parquet", ".pq") or not files[0].is_file():
            continue
        try:
            base = dataset_base(pq.read_schema(files[0]).metadata)
        except (OSError, ValueError):
            continue
        if base and base not in bases:
            bases.append(base)
    return partial(_locate, tuple(bases))


def _locate(bases: tuple[str, ...], name: str) -> str:
    if os.path.isabs(name) or os.path.exists(name):
        return name
    for base in bases:
        if os.path.exists(os.path.join(base, name)):
            return os.path.join(base, name)
    return name


def write_page(
    sections: Sequence[Section],
    page: Path,
    model: str,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    locate: Callable[[str], str] = str,
) -> None:
    """Render and write the page atomically (the previous file stays when anything fails)."""
    from clipcli.atomic import atomic_write

    text = render_page(sections, page, model, max_pixels, locate)
    with atomic_write(page, "w", encoding="utf-8") as f:
        f.write(text)


__all__ = ["Section", "dataset_locator", "render_page", "write_page"]
