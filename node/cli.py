"""The ``precedent`` command line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from node.catalog.database import CatalogConfigError
from node.catalog.recording import Catalog
from node.errors import CatalogUnavailable, ModelConfigError, StartupError
from node.logs import configure_logging
from node.settings import CONFIG_FILE_VARIABLE, ConfigError, Settings, load_settings

app = typer.Typer(
    help="Precedent: a DICOM AI node for breast imaging.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Catalog database administration.", no_args_is_help=True)
app.add_typer(db_app, name="db")

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        envvar=CONFIG_FILE_VARIABLE,
        help="TOML settings file (see config/precedent.toml).",
    ),
]
CONFIG_EXIT = 2
RUNTIME_EXIT = 1


def _fail(message: str, exit_code: int) -> typer.Exit:
    """Print an operator-facing error as plain text (no wrapping, no markup) and exit."""
    typer.echo(message, err=True)
    return typer.Exit(exit_code)


def _settings(config: Path | None) -> Settings:
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        raise _fail(str(exc), CONFIG_EXIT) from None
    configure_logging(settings.logging.level)
    return settings


@contextmanager
def _exiting_on_startup_errors() -> Iterator[None]:
    """What stops a command before it can work: a message for the operator and an exit code."""
    try:
        yield
    except CatalogConfigError as exc:
        raise _fail(f"configuration error: {exc}", CONFIG_EXIT) from None
    except CatalogUnavailable as exc:
        raise _fail(str(exc), RUNTIME_EXIT) from None
    except ModelConfigError as exc:
        raise _fail(f"configuration error: {exc}", CONFIG_EXIT) from None
    except StartupError as exc:
        raise _fail(f"cannot start: {exc}", RUNTIME_EXIT) from None


@app.command()
def serve(config: ConfigOption = None) -> None:
    """Run the node: receive, store and catalogue images until SIGTERM."""
    from node.service import serve_until_signalled

    settings = _settings(config)
    with _exiting_on_startup_errors():
        serve_until_signalled(settings, config)


@app.command("config")
def show_config(config: ConfigOption = None) -> None:
    """Print the effective settings (defaults, file and environment merged) as JSON."""
    settings = _settings(config)
    print(json.dumps(settings.model_dump(mode="json"), indent=2))


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None) -> None:
    """Create or migrate the catalog schema (``serve`` also does this at start-up)."""
    settings = _settings(config)
    with _exiting_on_startup_errors():
        Catalog.open(settings.catalog_url()).close()
    print("catalog schema is up to date")


@app.command()
def worker(
    config: ConfigOption = None,
    concurrency: Annotated[
        int | None, typer.Option(min=1, help="Tasks at once (default: queue.worker_concurrency).")
    ] = None,
) -> None:
    """Run an analysis worker (Celery) against the configured broker and catalog."""
    from workers.worker import run_worker

    settings = _settings(config)
    if concurrency is not None:
        settings = settings.model_copy(
            update={"queue": settings.queue.model_copy(update={"worker_concurrency": concurrency})}
        )
    with _exiting_on_startup_errors():
        run_worker(settings)


@app.command()
def reanalyze(
    config: ConfigOption = None,
    study: Annotated[str | None, typer.Option(help="Only this StudyInstanceUID.")] = None,
    failed: Annotated[bool, typer.Option("--failed", help="Only analyses that failed.")] = False,
) -> None:
    """Analyse again (with the configured model) everything, one study, or what failed."""
    from workers.admin import request_reanalysis

    settings = _settings(config)
    with _exiting_on_startup_errors():
        requested, published = request_reanalysis(settings, study_uid=study, failed_only=failed)
    print(f"{requested} analyses requested; {published} published now, the rest as workers free up")


@app.command()
def status(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """What the node holds and how its analyses stand."""
    from node.status import collect_status, print_status

    settings = _settings(config)
    with _exiting_on_startup_errors():
        report = collect_status(settings)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_status(report)
