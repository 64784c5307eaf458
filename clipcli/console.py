"""Everything the CLI says on stderr: messages, progress bars (on a terminal only) and summaries."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console

from clipcli.io import printable

err = Console(stderr=True, highlight=False, soft_wrap=True)


def say(message: str) -> None:
    err.print(printable(message), markup=False)


def skipped(path: str, reason: str) -> None:
    err.print(f"skipped {printable(path)}: {reason}", markup=False)


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
        self._task = self._bar.add_task(description, total=total, rate="")

    def advance(self, n: int) -> None:
        self._bar.advance(self._task, n)
        speed = self._bar.tasks[0].speed
        if speed:
            self._bar.update(self._task, rate=f"{speed:,.1f} {self.unit}/s")

    def update(self, **fields: Any) -> None:
        self._bar.update(self._task, **fields)

    def __enter__(self) -> Progress:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()


@contextmanager
def prompt_progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A callback for encoding prompts whose bar appears with the first batch, so a cache hit shows none."""
    bar = Progress(description, total, unit="prompts")
    started = False

    def advance(n: int) -> None:
        nonlocal started
        if not started:
            bar.__enter__()
            started = True
        bar.advance(n)

    try:
        yield advance
    finally:
        if started:
            bar.__exit__(None, None, None)


@contextmanager
def download_progress(name: str) -> Iterator[Any]:
    """A byte-counting callback for ``models.load_model(on_download=...)``."""
    from rich.progress import BarColumn, DownloadColumn, TextColumn, TransferSpeedColumn
    from rich.progress import Progress as RichProgress

    bar = RichProgress(
        TextColumn(f"downloading {name}"),
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
