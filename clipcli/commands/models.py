"""`clipcli models`: what can be loaded, and what is already on disk."""

from __future__ import annotations


def models() -> None:
    """List model names, which are cached or bundled (with sizes), and the cache folder.

    OpenAI's and the bundled models, then, where their extras are installed, open_clip's pretrained
    names (open_clip:ARCH/TAG) and the CLIP and SigLIP repos in the Hugging Face cache (hf:ORG/REPO).
    A table on a terminal; in a pipe, tab-separated rows (name, kind, status, bytes, path) for cut and awk.
    """
    from rich.console import Console
    from rich.table import Table

    from clipcli.cache import cache_dir
    from clipcli.io import stdout_is_tty
    from clipcli.models import default_model, list_models

    rows = []
    for entry in list_models():
        status = "bundled" if entry.kind == "bundled" else ("cached" if entry.available else "not downloaded")
        rows.append((entry.name, entry.kind, status, entry.size, str(entry.path) if entry.available else ""))
    if not stdout_is_tty():
        print("".join(f"{n}\t{k}\t{s}\t{'' if b is None else b}\t{p}\n" for n, k, s, b, p in rows), end="")
        return
    table = Table(title=f"cache: {cache_dir()}   default: {default_model()}")
    for column in ("name", "kind", "status", "size", "path"):
        table.add_column(column)
    for name, kind, status, size, path in rows:
        table.add_row(name, kind, status, f"{size / 2**20:,.1f} MiB" if size is not None else "", path)
    Console().print(table)
