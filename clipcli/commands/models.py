"""`clipcli models`: what can be loaded, and what is already on disk."""

from __future__ import annotations


def models() -> None:
    """List model names, which are cached or bundled (with sizes), and the cache folder."""
    from rich.console import Console
    from rich.table import Table

    from clipcli.models import cache_dir, default_model, list_models

    table = Table(title=f"cache: {cache_dir()}   default: {default_model()}")
    for column in ("name", "kind", "status", "size", "path"):
        table.add_column(column)
    for entry in list_models():
        status = "bundled" if entry.kind == "bundled" else ("cached" if entry.available else "not downloaded")
        size = f"{entry.size / 2**20:,.1f} MiB" if entry.size is not None else ""
        table.add_row(entry.name, entry.kind, status, size, str(entry.path) if entry.available else "")
    Console(width=200 if not Console().is_terminal else None).print(table)
