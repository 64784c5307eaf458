"""The Typer application: parses options, calls the core, maps errors to exit codes in one place.

Nothing here imports torch at module level, so ``clipcli --help`` answers at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from clipcli import __version__
from clipcli.commands.classify import classify
from clipcli.commands.embed import embed
from clipcli.commands.eval import evaluate
from clipcli.commands.models import models
from clipcli.commands.rank import rank
from clipcli.commands.train import make_shapes, train
from clipcli.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED, ClipCliError, Terminated


class _Group(TyperGroup):
    """Turns core errors into ``Error: ...`` and an exit code; a traceback only with --debug."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except ClipCliError as e:
            _report(e, ctx)
            raise typer.Exit(e.exit_code) from None
        except Terminated:
            typer.echo("Terminated.", err=True)
            raise typer.Exit(EXIT_TERMINATED) from None
        except KeyboardInterrupt:
            typer.echo("Interrupted.", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except BrokenPipeError:
            # The reader (head, less) went away: not an error for a pipeline.
            sys.stderr.close()
            os._exit(0)
        except Exception as e:
            if hasattr(e, "exit_code"):  # the CLI framework's own usage errors and exits
                raise
            _report(e, ctx, prefix="internal error: ", hint=" (rerun with --debug for the traceback)")
            raise typer.Exit(EXIT_INTERNAL) from None


def _debug(ctx: typer.Context) -> bool:
    return bool((ctx.obj or {}).get("debug")) or os.environ.get("CLIPCLI_DEBUG", "") not in ("", "0")


def _report(e: BaseException, ctx: typer.Context, prefix: str = "", hint: str = "") -> None:
    if _debug(ctx):
        import traceback

        traceback.print_exception(e)
    typer.echo(f"Error: {prefix}{e}{'' if _debug(ctx) else hint}", err=True)


app = typer.Typer(
    cls=_Group,
    name="clipcli",
    help="Zero-shot image classification, embedding, ranking and evaluation with OpenAI's CLIP.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"clipcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Exit codes: 0 success; 1 some inputs were skipped (or a --min-acc1 gate failed);
    2 usage error (bad option, unknown model, model not available, output not writable);
    3 internal error; 130 interrupted (Ctrl-C); 143 terminated (SIGTERM)."""
    ctx.obj = {"debug": debug}


app.command()(classify)
app.command()(embed)
app.command()(rank)
app.command("eval")(evaluate)
app.command()(models)
app.command()(train)
app.command("make-shapes")(make_shapes)


def _terminate(signum: int, frame: object) -> None:
    # A second SIGTERM ends the process at once; the first lets the run write what it has.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated


def main() -> NoReturn:
    """The console script: run the command, then leave without the interpreter's teardown."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
        code: object = 0
    except SystemExit as done:
        code = done.code
    _exit_now(code)


def _exit_now(code: object) -> NoReturn:
    """Flush the streams and end the process at once.

    Unloading torch (its CUDA build above all) at interpreter exit touches about 190 MiB of library
    pages and takes a few tenths of a second: it would set the peak memory of an embedding run and
    slow every short command. Nothing clipcli writes is pending by the time a command returns: files
    are closed and renamed, and the two streams are flushed here.
    """
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"), as Python itself reports it
        print(code, file=sys.stderr)
        status = 1
    with contextlib.suppress(BrokenPipeError):  # the reader went away; what it read is all it wanted
        sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
