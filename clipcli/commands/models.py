"""`clipcli models`: what can be loaded, and what is already on disk."""

from __future__ import annotations

# Room the kind, status, size and path columns need beside the name (with the table's borders) to be read.
MIN_OTHER_COLUMNS = 55


def models() -> None:
    """List model names, which are cached or bundled (with sizes), and the cache folder.

    OpenAI's and the bundled models, then, where their extras are installed, open_clip's pretrained
    names (open_clip:ARCH/TAG) and the CLIP and SigLIP repos in the Hugging Face cache (hf:ORG/REPO).
    A table on a terminal; in a pipe, tab-separated rows (name, kind, status, bytes, path) for cut and awk.
    """
    from clipcli.models import list_models
    from clipcli.store.formats import stdout_is_tty

    rows = []
    for entry in list_models():
        status = "bundled" if entry.kind == "bundled" else ("cached" if entry.available else "not downloaded")
        rows.append((entry.name, entry.kind, status, entry.size, str(entry.path) if entry.available else ""))
    if not stdout_is_tty():
        print("".join(f"{n}\t{k}\t{s}\t{'' if b is None else b}\t{p}\n" for n, k, s, b, p in rows), end="")
        return
    _print_table(rows)


def _print_table(rows: list[tuple[str, str, str, int | None, str]]) -> None:
    """The models as a table on the terminal: a name is there to be copied, so it is never cut or folded.
    The other columns fold to make room; where the terminal cannot hold them beside the longest name,
    kind and path are left out (the piped form has every column)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from clipcli.cache import cache_dir
    from clipcli.models import default_model
    from clipcli.store.formats import printable

    def cell(text: str) -> Text:  # a path or a name: text, never markup nor control characters
        return Text(printable(text))

    console = Console()
    longest = max((len(row[0]) for row in rows), default=4)
    full = console.width >= longest + MIN_OTHER_COLUMNS
    title = cell(f"cache: {cache_dir()}   default: {default_model()}")
    table = Table(title=title, box=box.HEAVY_HEAD if full else None, title_justify="left", caption_justify="left")
    table.add_column("name", no_wrap=True, min_width=longest, overflow="fold")
    for column in ("kind", "status", "size", "path") if full else ("status",):
        table.add_column(column, overflow="fold")
    for name, kind, status, size, path in rows:
        shown = f"{size / 2**20:,.1f} MiB" if size is not None else ""
        if full:
            table.add_row(cell(name), kind, status, shown, cell(path))
        else:
            table.add_row(cell(name), f"{status} {shown}".strip())
    if not full:
        table.caption = "narrow terminal: kind and path left out (clipcli models | cat shows them)"
    console.print(table)
