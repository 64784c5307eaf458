"""The Typer application: parses options, calls the core, maps errors to exit codes in one place.

Nothing here imports torch at module level, so ``clipcli --help`` answers at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperCommand, TyperGroup

from clipcli import __version__
from clipcli.commands.bench_precision import bench_precision
from clipcli.commands.classify import classify
from clipcli.commands.classify_text import classify_text
from clipcli.commands.dedup import dedup
from clipcli.commands.embed import embed
from clipcli.commands.eval import evaluate
from clipcli.commands.index import index
from clipcli.commands.models import models
from clipcli.commands.rank import rank
from clipcli.commands.serve import serve
from clipcli.commands.train import make_shapes, train
from clipcli.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED, ClipCliError, Terminated


class _Group(TyperGroup):
    """Turns core errors into ``Error: ...`` and an exit code; a traceback only with --debug."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        """Usage errors as one line, ``Error: ... (see 'clipcli CMD --help')``, and ``--debug`` anywhere."""
        argv = _debug_first(list(sys.argv[1:] if args is None else args))
        if not standalone_mode:
            return super().main(argv, prog_name, complete_var, False, windows_expand_args, **extra)
        try:
            result = super().main(argv, prog_name, complete_var, False, windows_expand_args, **extra)
        except typer.TyperException as e:
            ctx = getattr(e, "ctx", None)
            if type(e).__name__ == "NoArgsIsHelpError" and hasattr(e, "show"):
                e.show()  # `clipcli` alone shows the help
            else:
                where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
                from clipcli.store.formats import printable

                message = e.format_message().replace("Value error, ", "")  # pydantic's wording, through typer
                typer.echo(f"Error: {printable(message)}{where}", err=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("Aborted.", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)

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


class _Command(TyperCommand):
    """A subcommand that refuses an option given twice (which would otherwise keep the last silently),
    and whose help names arguments by their metavar alone (``INPUTS...``, not ``{inputs}... <list[str]>``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.param_type_name == "argument" and param.metavar:
                param.display_type_rich = lambda ctx: None  # type: ignore[attr-defined]

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.params:
            if param.param_type_name == "argument":
                name = param.metavar or f"{param.name.upper()}{'...' if param.nargs != 1 else ''}"
                pieces.append(name if param.required or name.startswith("[") else f"[{name}]")
        return pieces

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        _refuse_repeats(self.params, args)
        return super().parse_args(ctx, args)


def _refuse_repeats(params: Sequence[Any], args: Sequence[str]) -> None:
    from clipcli.errors import InputError

    options = {}  # option string -> (the parameter, whether it takes a value)
    for param in params:
        if param.param_type_name == "option" and not param.multiple:
            for flag in (*param.opts, *param.secondary_opts):
                options[flag] = (param, not param.is_flag)
    seen: dict[str, str] = {}
    tokens = iter(args)
    for token in tokens:
        if token == "--":
            break
        flag = token.split("=", 1)[0] if token.startswith("--") else token[:2]
        if flag not in options or not token.startswith("-"):
            continue
        param, takes_value = options[flag]
        if param.name in seen:
            raise InputError(f"{flag} given more than once ({seen[param.name]} came first); give it once")
        seen[param.name] = token.split("=", 1)[0] if "=" in token else flag
        if takes_value and "=" not in token and (token.startswith("--") or len(token) == 2):
            next(tokens, None)  # its value, which may look like an option


def _debug_first(argv: list[str]) -> list[str]:
    """Move ``--debug`` before the command, where the group reads it, wherever the user typed it."""
    end = argv.index("--") if "--" in argv else len(argv)
    if "--debug" not in argv[:end]:
        return argv
    return ["--debug", *(a for i, a in enumerate(argv) if not (a == "--debug" and i < end))]


def _debug(ctx: typer.Context) -> bool:
    return bool((ctx.obj or {}).get("debug")) or os.environ.get("CLIPCLI_DEBUG", "") not in ("", "0")


def _report(e: BaseException, ctx: typer.Context, prefix: str = "", hint: str = "") -> None:
    if _debug(ctx):
        import traceback

        traceback.print_exception(e)
    from clipcli.store.formats import printable

    typer.echo(f"Error: {printable(f'{prefix}{e}')}{'' if _debug(ctx) else hint}", err=True)


app = typer.Typer(
    cls=_Group,
    name="clipcli",
    help="Zero-shot image classification, embedding, search and evaluation with CLIP models (OpenAI, open_clip, "
    "Hugging Face CLIP and SigLIP), and zero-shot text classification with NLI models.",
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


app.command(cls=_Command)(classify)
app.command("classify-text", cls=_Command)(classify_text)
app.command(cls=_Command)(embed)
app.command(cls=_Command)(rank)
app.command(cls=_Command)(index)
app.command(cls=_Command)(dedup)
app.command(cls=_Command)(serve)
app.command("eval", cls=_Command)(evaluate)
app.command(cls=_Command)(models)
app.command(cls=_Command)(train)
app.command("make-shapes", cls=_Command)(make_shapes)
app.command("bench-precision", cls=_Command)(bench_precision)


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
    if code == EXIT_INTERRUPTED and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # SIGTERM came while Typer was still reading the command line, where it reports any
        # interruption as Ctrl-C: say what it was.
        typer.echo("Terminated.", err=True)
        code = EXIT_TERMINATED
    _exit_now(code)


def _exit_now(code: object) -> NoReturn:
    """Flush the streams and end the process at once.

    Unloading torch (its CUDA build above all) at interpreter exit touches hundreds of megabytes of
    library pages: it would set the peak memory of an embedding run and slow every short command
    (the README's benchmark section has the figures). Nothing clipcli writes is pending by the time a
    command returns: files are closed and renamed, and the two streams are flushed here.
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
