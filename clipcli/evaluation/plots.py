"""Pictures of an evaluation: a confusion-matrix PNG and an HTML page of the worst mistakes."""

from __future__ import annotations

import html
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import IO

import numpy as np

from clipcli.errors import ClipCliError, OutputError
from clipcli.evaluation.metrics import worst_confusions
from clipcli.evaluation.run import EvalResult

MAX_THUMBNAILS = 60


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ClipCliError("--plots needs matplotlib: pip install 'clipcli[plots]'") from None


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]


_STARTS = {".png": b"\x89PNG", ".jpg": b"\xff\xd8", ".html": b'<!doctype html><meta charset="utf-8"><title>'}


def _not_own(path: Path, kind: str) -> OutputError:
    return OutputError(f"{path}: is a link or not a {kind}; clipcli writes its plots as files of their own")


def _save(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write a file of the report whole (see :func:`clipcli.atomic.atomic_write`), as a file of its own:
    a link or a folder by its name is someone else's and refused, never written through or replaced; so
    is a file that does not start as clipcli's of that kind does (a PNG, a JPEG, this report's page)."""
    from clipcli.atomic import atomic_write
    from clipcli.store.ownership import refuse_unless_own

    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise _not_own(path, "file")
    refuse_unless_own(path, lambda head: head.startswith(_STARTS[path.suffix]), f"--plots {path.suffix[1:]}")
    with atomic_write(path) as f:
        write(f)


def write_plots(result: EvalResult, folder: Path) -> Path:
    """Write ``confusion-*.png`` and ``report-*.html`` for one result; returns the HTML page."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{folder}: cannot create ({e.strerror or e})") from e
    stem = _slug(f"{Path(result.model).name}-{result.templates}")
    confusion = np.array(result.confusion_matrix)
    n = len(result.classes)
    fig, ax = plt.subplots(figsize=(max(5, n * 0.22 + 2), max(4, n * 0.22 + 1.5)))
    image = ax.imshow(confusion, cmap="Blues")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{result.model} / {result.templates}: acc1 {result.metrics.get('acc1', float('nan')):.1%}")
    if n <= 40:
        ax.set_xticks(range(n), result.classes, rotation=90, fontsize=7)
        ax.set_yticks(range(n), result.classes, fontsize=7)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    png = folder / f"confusion-{stem}.png"
    try:
        _save(png, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)

    thumbs = folder / "thumbs"  # a folder of the report's own, never one a link leads to
    if thumbs.is_symlink() or (thumbs.exists() and not thumbs.is_dir()):
        raise _not_own(thumbs, "folder")
    rows = []
    p = result.predictions
    if p is not None:
        wrong = [i for i in range(len(p.ids)) if p.true[i] != p.predicted[i]][:MAX_THUMBNAILS]
        for i in wrong:
            src = p.ids[i]
            cell = html.escape(src)
            if os.path.isfile(src):
                from clipcli.images.decode import load_image

                thumbs.mkdir(exist_ok=True)
                target = thumbs / f"{stem}-{i}.jpg"
                try:
                    picture = load_image(Path(src))
                    picture.thumbnail((128, 128))
                except (OSError, ValueError):
                    picture = None
                if picture is not None:
                    _save(target, partial(picture.save, format="JPEG", quality=85))
                    cell = f'<img src="thumbs/{target.name}" alt="{html.escape(src)}"><br>{html.escape(src)}'
            rows.append(
                f"<tr><td>{cell}</td><td>{html.escape(p.true[i])}</td><td>{html.escape(p.predicted[i])}</td>"
                f"<td>{float(p.score[i]):.1%}</td></tr>"
            )
    pairs = "".join(
        f"<tr><td>{html.escape(t)}</td><td>{html.escape(q)}</td><td>{c}</td></tr>"
        for t, q, c in worst_confusions(confusion, result.classes, 15)
    )
    page = folder / f"report-{stem}.html"
    title = f"{html.escape(result.model)} / {html.escape(result.templates)} on {html.escape(result.dataset)}"
    headers = "<tr><th>image</th><th>true</th><th>predicted</th><th>score</th></tr>"
    text = f"""<!doctype html><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:4px 8px;border-bottom:1px solid #ddd}}</style>
<h1>{title}</h1>
<p>{result.n} images; {", ".join(f"{k} {v:.2%}" for k, v in result.metrics.items() if v == v)}</p>
<img src="{png.name}" alt="confusion matrix">
<h2>Most confused classes</h2><table><tr><th>true</th><th>predicted as</th><th>images</th></tr>{pairs}</table>
<h2>Misclassified images</h2><table>{headers}{"".join(rows)}</table>
"""
    _save(page, lambda f: f.write(text.encode("utf-8")))
    return page
