"""The one exception family the core raises; the CLI maps it to ``Error: ...`` and an exit code."""

from __future__ import annotations

# Exit codes, documented in the README.
EXIT_PARTIAL = 1  # the run finished, but some inputs were skipped (or a --min-acc1 gate failed)
EXIT_USAGE = 2  # nothing useful could be done: bad option, unknown model, unreadable config
EXIT_INTERNAL = 3  # a bug in clipcli; rerun with --debug and report the traceback
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT): 128 + 2, as shells report it
EXIT_TERMINATED = 143  # SIGTERM (timeout, kill, schedulers): 128 + 15


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that a run stops as on Ctrl-C: what it computed is written."""


class ClipCliError(Exception):
    """An error the user can fix; the message says what was wrong and what would be right."""

    exit_code = EXIT_USAGE


class ModelError(ClipCliError):
    """A model name, checkpoint or download that cannot be used."""


class DownloadError(ModelError):
    """A download that failed or did not match its checksum."""


class InputError(ClipCliError):
    """An input file (image list, labels, templates, pairs, manifest) that cannot be used."""


class OutputError(ClipCliError):
    """An output path or format that cannot be written."""
