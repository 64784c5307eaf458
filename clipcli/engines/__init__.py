"""Engines that run ``embed`` and ``eval`` past one process: the same decoding, models and files as the
local engine (:mod:`clipcli.engines.local`), scheduled by a distributed engine (Ray) instead of this process."""
