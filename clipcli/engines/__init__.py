"""Engines that run ``embed`` and ``eval``'s images: one contract (:mod:`clipcli.engines.base`), two
implementations, found by ``--engine`` name in :data:`ENGINES`: :mod:`clipcli.engines.local` (this
process) and :mod:`clipcli.engines.ray` (a Ray cluster)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clipcli.engines.base import Engine


def get_engine(name: str, address: str | None = None) -> Engine:
    """The engine named ``name`` (a key of :data:`ENGINES`); ``address``: the cluster's, where it has one."""
    from clipcli.errors import InputError

    try:
        factory = ENGINES[name]
    except KeyError:
        raise InputError(f"--engine {name}: no such engine (one of {', '.join(ENGINES)})") from None
    return factory(address)


def _local(address: str | None) -> Engine:
    from clipcli.engines.local import LocalEngine

    return LocalEngine()


def _ray(address: str | None) -> Engine:
    from clipcli.engines.ray import RayEngine

    return RayEngine(address)


ENGINES: dict[str, Callable[[str | None], Engine]] = {"local": _local, "ray": _ray}
"""The engines by ``--engine`` name; each imported when chosen (Ray's module stays unread otherwise)."""
