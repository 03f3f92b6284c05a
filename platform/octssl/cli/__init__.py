"""The `octssl` command line: thin typer commands that parse, load config and call the library.

The app and its error handling live here; the commands, one module per area, register on import:
``corpus`` (synth, ingest, label, info, verify, export-shards, publish), ``training`` (pretrain, finetune,
plot, sweep, report, demo), ``predict`` (export-model, predict, growth) and ``jobs`` (submit, jobs).
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import NoReturn

import typer
import typer.core
from rich.console import Console
from rich.markup import escape

from octssl.errors import OctsslError

#: ``octssl --help`` lists commands in the order of the workflow (commands not named here come last)
WORKFLOW = ("synth", "ingest", "label", "info", "verify", "export-shards", "publish", "pretrain", "finetune",
            "sweep", "report", "export-model", "predict", "growth", "plot", "demo", "submit", "jobs")


class _WorkflowOrder(typer.core.TyperGroup):
    def list_commands(self, ctx: typer.core.click.Context) -> list[str]:  # type: ignore[name-defined]
        names = super().list_commands(ctx)
        rank = {name: i for i, name in enumerate(WORKFLOW)}
        return sorted(names, key=lambda name: (rank.get(name, len(WORKFLOW)), name))


app = typer.Typer(
    cls=_WorkflowOrder,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,  # click's help: typer's rich panels print flags as "--json <bool>"
    pretty_exceptions_enable=False,
    help="octssl: self-supervised 3D-to-2D OCT pretraining (Ray + DeepSpeed), fine-tuning sweeps and corpora.",
)
console = Console(stderr=True, soft_wrap=True)  # an error stays one line, whatever the width


#: Exit status of a command that ran and failed (a library or file error, a check that found problems, a
#: job that did not succeed), and of a wrong command line (click's own usage errors, and those it cannot
#: see, :func:`_usage`). docs/operations.md has the table ("Exit codes").
EXIT_FAILED = 1
EXIT_USAGE = 2

#: What a command turns into one line naming the file and the problem (exit code 1), never a traceback.
_ERRORS = (OctsslError, OSError)


def _fail(err: Exception) -> None:
    if isinstance(err, OSError) and err.filename is not None:
        text = f"{err.filename}: {err.strerror or err}"
    else:
        text = str(err)
    console.print(f"[bold red]error:[/] {escape(text)}", soft_wrap=True)  # one line, brackets kept as typed
    raise typer.Exit(err.exit_status if isinstance(err, OctsslError) else EXIT_FAILED)


def _usage(text: str) -> NoReturn:
    """A wrong command line that click cannot see (a stray word, flags that exclude each other): one line,
    exit 2 like click's own usage errors."""

    console.print(f"[bold red]error:[/] {escape(text)}", soft_wrap=True)
    raise typer.Exit(EXIT_USAGE)


def config_path(config: Path | None, old: Path | None, command: str) -> tuple[Path, list[str]]:
    """The config a command was given, and words left over: positional CONFIG (the one spelling) or,
    deprecated, `-c/--config` (kept working with a one-line warning; a positional word beside it is then a
    stray word for the caller to report). No config at all is a usage error (exit 2)."""
    if old is not None:
        console.print(f"[yellow]deprecated:[/] `octssl {command} --config FILE` is now `octssl {command} FILE`")
        return old, [str(config)] if config is not None else []
    if config is None:
        _usage(f"missing CONFIG: `octssl {command} CONFIG` (a YAML file, see jobs/)")
    return config, []


def _version(value: bool) -> None:
    if value:
        print(f"octssl {version('octssl')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit"),
) -> None:
    """octssl: self-supervised 3D-to-2D OCT pretraining (Ray + DeepSpeed), fine-tuning sweeps and corpora."""


def main() -> None:
    """The `octssl` console script: library errors and file-system errors end in one line, not a traceback."""
    try:
        app()
    except OSError as err:  # e.g. --out naming an existing file, a folder under a file, a full disk
        where = f"{err.filename}: " if err.filename else ""
        console.print(f"[bold red]error:[/] {where}{err.strerror or err}")
        raise SystemExit(EXIT_FAILED) from None
    except OctsslError as err:
        console.print(f"[bold red]error:[/] {err}")
        raise SystemExit(err.exit_status) from None


# Commands are added below, one block per area; each imports its library lazily so that
# `octssl --help` stays fast.


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# The commands register on `app` as their modules are imported (after everything above exists).
from octssl.cli import apply, cluster, corpus, training  # noqa: E402, F401
