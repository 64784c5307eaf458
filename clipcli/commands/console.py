"""Everything the CLI says on stderr: messages, progress bars (on a terminal only) and summaries."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions
from rich.text import Text

from clipcli.store.formats import printable

if TYPE_CHECKING:
    from rich.segment import Segment

    from clipcli.images.sources import Skipped

err = Console(stderr=True, highlight=False, soft_wrap=True)


def say(message: str) -> None:
    err.print(printable(message), markup=False)


def skipped(path: str, reason: str) -> None:
    err.print(f"skipped {printable(path)}: {printable(reason)}", markup=False)


class CountedTitle(Text):
    """A table title that ends in a count, ``zero-shot evaluation on PATH (32 images)``. It wraps at the
    table's width like any title, a long path folded, but the count never splits: ``(32`` at the end of
    one line and ``images)`` on the next is what a user saw, and what made tests pass or fail on the
    length of a temporary folder's path. Where the count does not fit after the last line of ``head`` it
    starts a line of its own. Rich breaks lines at every Unicode space, a non-breaking one included, so
    the wrapping is done here rather than with a special character (and the bytes stay plain spaces)."""

    def __init__(self, head: str, count: str) -> None:
        super().__init__(f"{head} {count}", no_wrap=False, overflow="fold")
        self.head, self.count = head, count

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterable[Segment]:
        width = options.max_width
        if cell_len(self.plain) <= width or cell_len(self.count) > width:
            yield from super().__rich_console__(console, options)
            return
        lines = [line.plain.rstrip() for line in Text(self.head, overflow="fold").wrap(console, width)]
        if cell_len(lines[-1]) + 1 + cell_len(self.count) <= width:
            lines[-1] = f"{lines[-1]} {self.count}"
        else:
            lines.append(self.count)
        yield from Text("\n".join(lines), justify=self.justify, overflow="fold").__rich_console__(console, options)


class Tally:
    """The one consumer of a run's per-batch callbacks: reports each skipped input on stderr (one line,
    ``skipped PATH: reason``), counts them, and advances a progress bar if there is one."""

    def __init__(self, bar: Progress | None = None) -> None:
        self.bar = bar
        self.skipped = 0

    def on_skip(self, item: Skipped) -> None:
        self.skipped += 1
        skipped(item.path, item.reason)

    def on_batch(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(n)


class Progress:
    """A bar with a rate on a terminal; nothing at all when stderr is a pipe or file."""

    def __init__(self, description: str, total: int | None, unit: str = "img") -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        self.unit = unit
        self._bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=err,
            disable=not err.is_terminal,
            transient=True,
        )
        from rich.markup import escape

        # A model's or dataset's name in the description is text, never markup nor control characters.
        self._task = self._bar.add_task(escape(printable(description)), total=total, rate="")
        self._entered = self._shown = False

    def advance(self, n: int) -> None:
        self._show()
        self._bar.advance(self._task, n)
        speed = self._bar.tasks[0].speed
        if speed:
            self._bar.update(self._task, rate=f"{speed:,.1f} {self.unit}/s")

    def update(self, **fields: Any) -> None:
        self._show()
        self._bar.update(self._task, **fields)

    def _show(self) -> None:
        # Shown from its first news, not from __enter__: a stage that runs before it (encoding prompts)
        # has the terminal to itself, as rich allows one live display at a time.
        if self._entered and not self._shown:
            self._bar.start()
            self._shown = True

    def hide(self) -> None:
        if self._shown:
            self._bar.stop()
            self._shown = False

    def __enter__(self) -> Progress:
        self._entered = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._entered = False
        self.hide()


@contextmanager
def prompt_progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A callback for encoding prompts: its bar appears with the first batch (a cache hit shows none)
    and goes when the last prompt is encoded, before the next stage's bar."""
    with Progress(description, total, unit="prompts") as bar:
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            bar.advance(n)
            if done >= total:
                bar.hide()

        yield advance


@contextmanager
def download_progress(name: str) -> Iterator[Any]:
    """A byte-counting callback for ``models.load_model(on_download=...)``."""
    from rich.markup import escape
    from rich.progress import BarColumn, DownloadColumn, TextColumn, TransferSpeedColumn
    from rich.progress import Progress as RichProgress

    bar = RichProgress(
        TextColumn(escape(printable(f"downloading {name}"))),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
        disable=not err.is_terminal,
        transient=True,
    )
    task = bar.add_task(name, total=None)
    started = False

    def on_chunk(n: int, total: int | None) -> None:
        nonlocal started
        if not started:  # shown only when a download really happens, not for every load
            bar.start()
            started = True
        if bar.tasks[0].total is None and total:
            bar.update(task, total=total)
        bar.advance(task, n)

    try:
        yield on_chunk
    finally:
        if started:
            bar.stop()
