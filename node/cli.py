"""The ``precedent`` command line."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from node.catalog.database import CatalogConfigError
from node.catalog.recording import Catalog
from node.errors import CatalogUnavailable, ModelConfigError, StartupError, TlsConfigError
from node.logs import configure_logging
from node.settings import CONFIG_FILE_VARIABLE, ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from node.catalog.audit import Outcome

app = typer.Typer(
    help="Precedent: a DICOM AI node for breast imaging.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Catalog database administration.", no_args_is_help=True)
app.add_typer(db_app, name="db")
destinations_app = typer.Typer(help="The peers results are sent to.", no_args_is_help=True)
app.add_typer(destinations_app, name="destinations")

_AUDITED_COMMAND = "precedent.audited_command"


def _note_command(ctx: typer.Context, config: Path | None) -> Path | None:
    """Remember the running command for its audit row (:func:`_audit_command`): every
    command that reads or changes the node's data takes the node's settings."""
    ctx.meta[_AUDITED_COMMAND] = ctx
    return config


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        envvar=CONFIG_FILE_VARIABLE,
        help="TOML settings file (see config/precedent.toml).",
        callback=_note_command,
    ),
]
CONFIG_EXIT = 2
RUNTIME_EXIT = 1


class _Failed(typer.Exit):
    """An exit with the message the operator was shown, which the audit trail keeps too."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(exit_code)
        self.message = message


def _fail(message: str, exit_code: int) -> typer.Exit:
    """Print an operator-facing error as plain text (no wrapping, no markup) and exit."""
    typer.echo(message, err=True)
    return _Failed(message, exit_code)


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
    except (ModelConfigError, TlsConfigError) as exc:
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


@destinations_app.command("check")
def destinations_check(config: ConfigOption = None) -> None:
    """C-ECHO every configured destination; exit 1 if any does not answer."""
    from node.forward import echo, new_ae
    from node.tls import OutgoingTls

    settings = _settings(config)
    if not settings.destinations:
        raise _fail("no [[destinations]] are configured", RUNTIME_EXIT)
    with _exiting_on_startup_errors():
        outgoing = OutgoingTls.for_destinations(settings.tls, settings.destinations)
    ae = new_ae(settings.dicom.ae_title, settings.forwarding)
    results = [echo(d, ae, outgoing.tls_args(d)) for d in settings.destinations]
    for result in results:
        d = result.destination
        mark = "ok  " if result.ok else "FAIL"
        print(f"{mark} {d.name}: {d.ae_title} at {d.host}:{d.port}: {result.detail}")
    if not all(result.ok for result in results):
        raise typer.Exit(RUNTIME_EXIT)


@app.command()
def reindex(
    config: ConfigOption = None,
    re_embed: Annotated[
        bool, typer.Option("--re-embed", help="Analyse every stored image again with --model.")
    ] = False,
    model: Annotated[Path | None, typer.Option(help="The new model bundle (with --re-embed).")] = None,
) -> None:
    """Rebuild the similarity index from the catalog; or, with --re-embed, embed the whole
    archive with a new model and build its index (the node serves meanwhile; rerun to resume)."""
    from rich.progress import Progress

    from workers.reindex import re_embed as re_embed_archive
    from workers.reindex import rebuild_index
    from workers.runtime import bundle_of

    settings = _settings(config)
    if re_embed != (model is not None):
        raise _fail("--re-embed and --model go together", CONFIG_EXIT)
    with _exiting_on_startup_errors(), Progress() as bar:
        if model is not None:
            task = bar.add_task("re-embedding", total=None)
            done = re_embed_archive(
                settings, model, lambda n, total: bar.update(task, completed=n, total=total)
            )
            bar.stop()
            print(
                f"model {done.model_id[:12]}: {done.analysed} images embedded, {done.failed} failed, "
                f"{done.indexed} indexed; to switch, set model.bundle = {model} and restart the node"
            )
            return
        model_id = bundle_of(settings).id
        task = bar.add_task("indexing", total=None)
        count = rebuild_index(settings, model_id, lambda n, total: bar.update(task, completed=n, total=total))
    print(f"similarity index of model {model_id[:12]} rebuilt: {count} vectors")


@app.command()
def similar(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A DICOM image.")],
    config: ConfigOption = None,
    k: Annotated[int, typer.Option("--k", min=1, max=1000, help="How many studies.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """The stored studies most similar to an image that is not stored."""
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from workers.similar_file import NotAnalysable, similar_to_file

    settings = _settings(config)
    with _exiting_on_startup_errors():
        try:
            found = similar_to_file(settings, file, k)
        except NotAnalysable as exc:
            raise _fail(str(exc), RUNTIME_EXIT) from None
    if as_json:
        print(json.dumps(asdict(found), indent=2))
        return
    console = Console()
    console.print(f"{file}: {found.finding} ({found.probability:.2f}), model {found.model_id[:12]}")
    table = Table("rank", "distance", "finding", "patient", "date", "accession", "study")
    for case in found.cases:
        table.add_row(
            str(case.rank),
            f"{case.distance:.4f}",
            case.finding,
            case.patient_id,
            case.study_date,
            case.accession_number,
            case.study_instance_uid,
        )
    console.print(table)


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


@app.command()
def phantoms(
    out: Annotated[Path, typer.Option(help="Folder to write into; it must be new or empty unless --force.")],
    n: Annotated[int, typer.Option("--n", min=1, help="How many images.")] = 30,
    seed: Annotated[int, typer.Option(min=0, help="The same seed writes the same files, byte for byte.")] = 0,
    file_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="dicom: US images in patients, studies and series, with labels.csv; png: BUSI's layout.",
        ),
    ] = "dicom",
    force: Annotated[
        bool,
        typer.Option("--force", help="Write into a non-empty folder, replacing files of the same names."),
    ] = False,
) -> None:
    """Write synthetic breast ultrasound phantoms: labelled images for demos and tests, not for clinical use.

    A non-empty --out is refused without --force, so that a typo cannot mix phantoms into a
    folder of real images.
    """
    from workers.phantoms import LABELS, write_dicom_phantoms, write_png_phantoms

    if file_format not in ("dicom", "png"):
        raise typer.BadParameter(f"{file_format!r} is not one of 'dicom', 'png'", param_hint="'--format'")
    try:
        if out.exists() and not out.is_dir():
            raise typer.BadParameter(f"{out} exists and is not a folder", param_hint="'--out'")
        if out.exists() and not force and any(out.iterdir()):
            raise typer.BadParameter(
                f"{out} is not empty; name a new or empty folder, or add --force", param_hint="'--out'"
            )
        if file_format == "dicom":
            records = write_dicom_phantoms(out, n, seed)
            labels = [record.label for record in records]
            grouping = f" in {len({r.patient_id for r in records})} patients"
            grouping += f", {len({r.study_instance_uid for r in records})} studies"
        else:
            labels = [record.label for record in write_png_phantoms(out, n, seed)]
            grouping = ""
    except OSError as exc:
        raise _fail(f"cannot write phantoms to {out}: {exc}", RUNTIME_EXIT) from None
    counts = ", ".join(f"{labels.count(label)} {label}" for label in LABELS)
    print(f"wrote {n} synthetic {file_format} phantoms ({counts}){grouping} to {out}; not for clinical use")


@app.command("train")
def train_model(
    data: Annotated[
        Path,
        typer.Option(
            help="A folder per class (BUSI), a CSV manifest (path,label[,patient_id]), DICOM files "
            "with a labels CSV (SOPInstanceUID or AccessionNumber), or a BI-RADS sheet (CDD-CESM)."
        ),
    ],
    arch: Annotated[str, typer.Option(help="Architecture: densenet121, vgg16_lstm, mobilenet_v2, cnn4, ...")],
    out: Annotated[Path, typer.Option(help="The model bundle to write.")],
    epochs: Annotated[int, typer.Option(min=1, help="At most this many epochs.")] = 30,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    size: Annotated[int, typer.Option(help="Input size in pixels (a square).")] = 224,
    folds: Annotated[
        int | None, typer.Option(min=2, help="K-fold cross-validation instead of an 80:20 split.")
    ] = None,
    seed: int = 0,
    backbone_weights: Annotated[
        Path | None, typer.Option(help="A torchvision ImageNet checkpoint file for the backbone.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[
        int | None, typer.Option(min=1, help="CPU threads for torch (default: one per core).")
    ] = None,
    lr: Annotated[float, typer.Option(help="Adam's initial learning rate.")] = 1e-3,
    patience: Annotated[int, typer.Option(min=1, help="Epochs without a better validation loss.")] = 5,
    labels: Annotated[
        str | None,
        typer.Option(
            help="Label order, ascending severity, comma-separated (e.g. cyst,fibroadenoma,carcinoma)."
        ),
    ] = None,
    clinical_use: Annotated[
        bool, typer.Option("--clinical-use", help="Mark the bundle as cleared for clinical use.")
    ] = False,
) -> None:
    """Train a model on a labelled data set and write it as a bundle; rerun the same command to resume."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TaskID, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bars

    from workers.datasets import DataSetError, load_data_set
    from workers.train import Progress, TrainingError, TrainingOptions, metrics_lines, train

    try:
        options = TrainingOptions(
            architecture=arch,
            epochs=epochs,
            batch_size=batch_size,
            size=size,
            learning_rate=lr,
            patience=patience,
            folds=folds,
            seed=seed,
            backbone_weights=backbone_weights,
            device=device,
            threads=threads,
            clinical_use=clinical_use,
        )
    except ValueError as exc:
        raise _fail(str(exc), CONFIG_EXIT) from None
    if clinical_use:
        typer.echo(
            "warning: --clinical-use marks this bundle as cleared for clinical use; do so only for a "
            "model validated for its intended use under your site's regulatory process",
            err=True,
        )
    columns = (
        TextColumn("{task.description}"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Bars(*columns, console=Console(stderr=True)) as bars:
        tasks: dict[tuple[str, str], TaskID] = {}

        def bar(key: tuple[str, str], title: str, total: int) -> TaskID:
            if key not in tasks:
                tasks[key] = bars.add_task(title, total=total, status="")
            return tasks[key]

        def show(step: Progress) -> None:
            if step.task == "decode":
                bars.update(bar(("decode", ""), "decoding images", step.total), completed=step.completed)
                return
            epoch_bar = bar(("epoch", step.run), f"{step.run}: epochs", options.epochs)
            batch_bar = bar(("batch", step.run), f"{step.run}: batches", step.total)
            if step.task == "batch":
                bars.update(batch_bar, completed=step.completed, total=step.total)
                return
            values = step.values
            status = f"val loss {values['val_loss']:.3f}, accuracy {values['val_accuracy']:.2f}"
            bars.update(epoch_bar, completed=step.completed, status=f"{status}, lr {values['lr']:.0e}")
            if values.get("stopped") or step.completed == step.total:
                bars.update(epoch_bar, total=step.completed)
                bars.update(batch_bar, visible=False)

        try:
            dataset = load_data_set(data, [name.strip() for name in labels.split(",")] if labels else None)
            result = train(dataset, out, options, show)
        except (DataSetError, TrainingError) as exc:
            bars.stop()
            raise _fail(str(exc), RUNTIME_EXIT) from None
        except KeyboardInterrupt:
            bars.stop()
            raise _fail(
                "interrupted: run the same command again to resume from the last epoch", 130
            ) from None
    for line in metrics_lines(result.description):
        print(line)
    print(f"wrote {out} (bundle id {result.bundle_id[:16]}, clinical use: {str(clinical_use).lower()})")


@app.command("evaluate")
def evaluate_bundle(
    data: Annotated[Path, typer.Option(help="The labelled data set, in any layout precedent train reads.")],
    bundle: Annotated[Path, typer.Option(help="The model bundle to evaluate.")],
    out: Annotated[
        Path | None, typer.Option(help="Report folder (default: evaluation-<bundle file name>).")
    ] = None,
    split: Annotated[
        str,
        typer.Option(
            help="auto: the bundle's recorded held-out test set when --data is the data set it was "
            "trained on, else all images; test: that set or an error; all: every image."
        ),
    ] = "auto",
    compare: Annotated[
        str | None,
        typer.Option(
            help="More models side by side, comma-separated: bundle files, or architecture names to "
            "train here on --data with the bundle's recorded recipe (written to <out>/models)."
        ),
    ] = None,
    ks: Annotated[
        str, typer.Option(help="The k of P@k, R@k and NDCG@k, comma-separated.")
    ] = "1,5,10,20,50,100",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    threads: Annotated[
        int | None, typer.Option(min=1, help="CPU threads for torch (default: one per core).")
    ] = None,
    phantoms: Annotated[
        bool,
        typer.Option(
            "--phantoms",
            help="Label the results as results on synthetic phantoms (DICOM phantoms are recognised "
            "by themselves; PNG ones carry no marker).",
        ),
    ] = False,
) -> None:
    """Evaluate a model bundle on a labelled data set: an HTML report with plots, and metrics.json."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TaskID, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bars
    from rich.table import Table
    from rich.text import Text

    from workers.evaluate import EvaluationError, EvaluationOptions, Progress, evaluate
    from workers.evaluation_report import summary_rows, write_report

    try:
        k_values = tuple(int(k) for k in ks.split(",") if k.strip())
    except ValueError:
        raise _fail(f"--ks must be whole numbers separated by commas, not {ks!r}", CONFIG_EXIT) from None
    try:
        options = EvaluationOptions(
            split=split,
            ks=k_values,
            device=device,
            batch_size=batch_size,
            threads=threads,
            synthetic=phantoms,
        )
    except ValueError as exc:
        raise _fail(str(exc), CONFIG_EXIT) from None
    folder = out or Path(f"evaluation-{bundle.name}")
    others = [name.strip() for name in (compare or "").split(",") if name.strip()]
    columns = (TextColumn("{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn())
    with Bars(*columns, TimeElapsedColumn(), console=Console(stderr=True)) as bars:
        tasks: dict[tuple[str, str], TaskID] = {}

        def show(step: Progress) -> None:
            key = (step.task, step.model)
            if key not in tasks:
                titles = {"train": "training: epochs", "infer": "images", "analyse": "metrics, PCA, t-SNE"}
                title = f"{step.model}: {titles[step.task]}"
                tasks[key] = bars.add_task(title, total=step.total)
            bars.update(tasks[key], completed=step.completed, total=step.total)

        try:
            evaluation = evaluate(data, [bundle, *others], options, folder, show)
            files = write_report(evaluation, folder)
        except EvaluationError as exc:
            bars.stop()
            raise _fail(str(exc), RUNTIME_EXIT) from None
        except KeyboardInterrupt:
            bars.stop()
            raise _fail("interrupted", 130) from None
    console = Console()
    for banner in evaluation.banners:
        console.print(Text(banner, style="bold red"))
    for warning in evaluation.warnings:
        console.print(Text(f"warning: {warning}", style="yellow"))
    console.print(Text(f"{evaluation.data.source}: evaluated on {evaluation.split_reason}"))
    table = Table("", *(model.name for model in evaluation.models))
    for name, cells in summary_rows(evaluation):
        table.add_row(name, *cells)
    console.print(table)
    print(f"report: {files.html}")
    print(f"metrics: {files.json}")


@app.command()
def demo(
    directory: Annotated[
        Path, typer.Option("--dir", help="Folder for everything the demo makes; a rerun reuses it.")
    ] = Path("precedent-demo"),
    n: Annotated[int, typer.Option("--n", min=2, help="Phantom images to train the demo model on.")] = 300,
    push: Annotated[
        int, typer.Option("--push", min=1, help="Phantom images of other patients to send to the node.")
    ] = 30,
    epochs: Annotated[int, typer.Option(min=1, help="At most this many training epochs.")] = 15,
    size: Annotated[int, typer.Option(min=32, max=512, help="The model's input size in pixels.")] = 64,
    seed: Annotated[int, typer.Option(min=0, help="The same seed makes the same phantoms and model.")] = 0,
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="The node's DICOM port (default: a free one).")
    ] = None,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds to wait for the results.")] = 300,
) -> None:
    """See the whole node work in a few minutes, on synthetic phantoms: not for clinical use.

    Writes phantoms, trains a small model on them, starts the node on 127.0.0.1, sends it other
    phantoms' studies over DICOM, and shows what came back: findings, Grad-CAM PNGs, the
    Structured Reports and the similar studies a C-FIND finds. Everything stays under --dir.
    """
    from rich.console import Console

    from workers.demo import DemoError, DemoOptions, run_demo

    try:
        options = DemoOptions(
            directory=directory,
            n=n,
            push=push,
            epochs=epochs,
            size=size,
            seed=seed,
            port=port,
            timeout=timeout,
        )
    except ValueError as exc:
        raise _fail(str(exc), CONFIG_EXIT) from None
    try:
        with _exiting_on_startup_errors():
            run_demo(options, Console(highlight=False))
    except DemoError as exc:
        raise _fail(f"demo failed: {exc}", RUNTIME_EXIT) from None
    except KeyboardInterrupt:
        raise _fail("interrupted: the node is stopped; rerun the same command to go on", 130) from None


# Services, not commands: what the node and its workers do is audited at the DICOM edge.
# `config` prints the settings and reads no data.
_NOT_AUDITED = frozenset({"serve", "worker", "config"})


@app.callback()
def _audited(ctx: typer.Context) -> None:
    # One place for the audit row of every command, written as the command ends.
    ctx.call_on_close(lambda: _audit_command(ctx))


def _audit_command(root: typer.Context) -> None:
    """Write the audit row of the command that has just ended: its name, arguments, OS user
    and exit code.

    Called as the root context closes, which happens while the exception that ends a
    command (an Exit with its code, or an error) is still being handled, so
    ``sys.exc_info()`` names it. A command whose settings cannot be read cannot be
    audited; one whose row the catalog does not take has run nonetheless, and says so.
    """
    command = root.meta.get(_AUDITED_COMMAND)
    if command is None:
        return
    action = command.command_path.removeprefix(root.info_name or "").strip()
    if action in _NOT_AUDITED:
        return
    try:
        settings = load_settings(command.params.get("config"))
    except ConfigError:
        return
    if not settings.audit.enabled:
        return
    from node.catalog.audit import AuditTrail, command_subject, os_user

    status, outcome, reason = _ending(sys.exc_info()[1])
    url = settings.catalog_url()
    try:
        catalog = Catalog.open(url)
        try:
            AuditTrail(catalog, settings.audit).record_command(
                action,
                command_subject(command.params, url),
                user=os_user(),
                status=status,
                outcome=outcome,
                reason=reason,
            )
        finally:
            catalog.close()
    except Exception as exc:  # the command has run: its own outcome stands, with a warning
        typer.echo(f"warning: this command is not in the audit trail: {exc}", err=True)


def _ending(exc: BaseException | None) -> tuple[int, Outcome, str]:
    """How a command ended: the exit code ``precedent`` gives, its outcome and why."""
    if exc is None or isinstance(exc, typer.Exit):
        code = 0 if exc is None else exc.exit_code
        outcome: Outcome = "success" if code == 0 else "cancelled" if code == 130 else "failure"
        return code, outcome, exc.message if isinstance(exc, _Failed) else ""
    if isinstance(exc, KeyboardInterrupt):
        return 130, "cancelled", "interrupted"
    if isinstance(exc, typer.TyperException):  # a usage error
        return exc.exit_code, "failure", exc.format_message()
    return 1, "failure", f"{type(exc).__name__}: {exc}"


def _moment(text: str) -> datetime:
    from node.catalog.audit import moment

    try:
        return moment(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command("audit")
def audit_export(
    since: Annotated[
        datetime,
        typer.Option(
            parser=_moment,
            metavar="WHEN",
            help="From this moment on: an ISO 8601 date or time (UTC unless it carries an offset), "
            "or an age: 30m, 12h, 7d, 2w.",
        ),
    ],
    config: ConfigOption = None,
    until: Annotated[
        datetime | None,
        typer.Option(parser=_moment, metavar="WHEN", help="Before this moment (as --since)."),
    ] = None,
    actor: Annotated[
        str | None, typer.Option(help="dicom (requests of DICOM peers) or admin (precedent commands).")
    ] = None,
    action: Annotated[
        str | None,
        typer.Option(
            help="associate, store, find, similar, move, get, dropped, or a command (e.g. 'db upgrade')."
        ),
    ] = None,
    calling_ae: Annotated[str | None, typer.Option(help="Only requests from this calling AE title.")] = None,
    file_format: Annotated[
        str, typer.Option("--format", help="csv (a header; subject as JSON text) or json (JSON Lines).")
    ] = "csv",
    output: Annotated[Path | None, typer.Option(help="Write to this file, not standard output.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many events.")] = None,
) -> None:
    """Export the audit trail: who asked the node for what, from where, when, and the outcome."""
    from node.catalog.audit import ACTORS, AuditTrail, write_csv, write_json_lines

    if file_format not in ("csv", "json"):
        raise typer.BadParameter(f"{file_format!r} is not one of 'csv', 'json'", param_hint="'--format'")
    if actor is not None and actor not in ACTORS:
        raise typer.BadParameter(f"{actor!r} is not one of 'dicom', 'admin'", param_hint="'--actor'")
    settings = _settings(config)
    write = write_csv if file_format == "csv" else write_json_lines
    with _exiting_on_startup_errors():
        catalog = Catalog.open(settings.catalog_url())
        try:
            trail = AuditTrail(catalog, settings.audit)
            events = trail.events(
                since, until, actor=actor, action=action, calling_ae=calling_ae, limit=limit
            )
            if output is None:
                write(events, sys.stdout)
                return
            try:
                with output.open("w", encoding="utf-8", newline="") as out:
                    count = write(events, out)
            except OSError as exc:
                raise _fail(f"cannot write {output}: {exc.strerror or exc}", RUNTIME_EXIT) from None
            typer.echo(f"{count} events written to {output}", err=True)
        finally:
            catalog.close()
