"""The evaluation report: one self-contained HTML file, the numbers as JSON, the predictions as CSV.

``report.html`` opens anywhere, offline: plots are PNG images embedded as base64 data URIs,
tables are HTML, there is no script and no external resource. It starts with the banners an
:class:`workers.evaluate.Evaluation` carries (synthetic phantoms, research model: not for
clinical use), then a header (data set, models with id and architecture, date, split and why),
a summary table with the models side by side, and per model the classification tables,
confusion matrix, ROC curves, what training recorded (mean ± sd over folds), the retrieval
table in the shape of the retrieval paper's Table 1 (L2 and cosine side by side) with P@k and
NDCG@k against k, and PCA and t-SNE views of the embedding space coloured by label.

``metrics.json`` is :func:`workers.evaluate.evaluation_json`; ``predictions.csv`` has a row per
model and image: the file, its label, the predicted class and every class probability.

Plots are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas, never through
pyplot, so no global state or display backend is involved.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from workers.evaluate import Evaluation, EvaluationError, ModelEvaluation, evaluation_json, prepare_folder
from workers.files import write_atomically

__all__ = [
    "HTML_NAME",
    "JSON_NAME",
    "PREDICTIONS_NAME",
    "ReportFiles",
    "render_html",
    "summary_rows",
    "write_report",
]

HTML_NAME = "report.html"
JSON_NAME = "metrics.json"
PREDICTIONS_NAME = "predictions.csv"
DPI = 100
_PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
.banner { background: #b00020; color: #fff; font-weight: bold; font-size: 1.15em; padding: .6em 1em;
          margin: .3em 0; border-radius: 4px; text-transform: uppercase; }
.warning { background: #fff3cd; border: 1px solid #e0c36a; padding: .5em 1em; margin: .3em 0; }
table { border-collapse: collapse; margin: .6em 0 1.2em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f2f2f2; }
td.name, th.name { text-align: left; }
caption { text-align: left; font-weight: bold; padding: .3em 0; }
img { max-width: 100%; margin: .3em .6em .6em 0; vertical-align: top; }
.note { color: #555; font-size: .92em; }
"""


@dataclass(frozen=True)
class ReportFiles:
    """What :func:`write_report` wrote."""

    html: Path
    json: Path
    predictions: Path


# --- files ------------------------------------------------------------------------------------


def write_report(evaluation: Evaluation, out: Path) -> ReportFiles:
    """Write ``report.html``, ``metrics.json`` and ``predictions.csv`` into ``out``, each atomically.

    Raises :class:`workers.evaluate.EvaluationError` when ``out`` cannot be written.
    """
    prepare_folder(out)
    files = ReportFiles(out / HTML_NAME, out / JSON_NAME, out / PREDICTIONS_NAME)
    try:
        write_atomically(
            files.json, json.dumps(evaluation_json(evaluation), indent=2, ensure_ascii=False).encode()
        )
        write_atomically(files.predictions, _predictions_csv(evaluation).encode())
        write_atomically(files.html, render_html(evaluation).encode())
    except OSError as error:
        raise EvaluationError(f"cannot write the report to {out}: {error.strerror or error}") from None
    return files


def _predictions_csv(evaluation: Evaluation) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    labels = list(dict.fromkeys(label for m in evaluation.models for label in m.bundle.labels))
    writer.writerow(["model", "file", "label", "predicted", *(f"p_{label}" for label in labels)])
    files = evaluation.files
    for model in evaluation.models:
        position = {label: i for i, label in enumerate(model.bundle.labels)}
        for row, (name, example) in enumerate(zip(files, evaluation.examples, strict=True)):
            probabilities = model.probabilities[row]
            predicted = model.bundle.labels[int(np.argmax(probabilities))]
            cells = [f"{probabilities[position[label]]:.6f}" if label in position else "" for label in labels]
            writer.writerow([model.name, name, example.label, predicted, *cells])
    return buffer.getvalue()


# --- summary ----------------------------------------------------------------------------------


def summary_rows(evaluation: Evaluation) -> list[tuple[str, list[str]]]:
    """The models side by side: a row per measure (name, one cell per model), as the papers'
    comparison tables; the CLI prints these rows too."""
    k = 5 if 5 in evaluation.ks else evaluation.ks[0]
    models = evaluation.models
    rows: list[tuple[str, list[str]]] = [
        ("architecture", [m.bundle.architecture for m in models]),
        ("model id", [m.bundle.id[:12] for m in models]),
        ("images", [str(len(m.true)) for m in models]),
        ("accuracy", [_number(m.classification["accuracy"]) for m in models]),
    ]
    for measure in ("precision", "recall", "f1", "auc", "sensitivity", "specificity"):
        rows.append(
            (f"macro {_MEASURES[measure]}", [_number(m.classification["macro"][measure]) for m in models])
        )
    for metric in ("cosine", "l2"):
        rows.append((f"P@{k} ({metric})", [_retrieval(m, metric, "precision", k) for m in models]))
        rows.append((f"NDCG@{k} ({metric})", [_retrieval(m, metric, "ndcg", k) for m in models]))
        rows.append((f"mAP ({metric})", [_retrieval(m, metric, "map", None) for m in models]))
    rows.append(
        (f"search ms/query (cosine, k={k})", [_retrieval(m, "cosine", "search_ms", k) for m in models])
    )
    rows.append(
        ("inference ms/image", [_number(m.inference_seconds / max(len(m.true), 1) * 1e3, 2) for m in models])
    )
    rows.append(("recorded at training", [_recorded_accuracy(m) for m in models]))
    return rows


_MEASURES = {
    "precision": "precision",
    "recall": "recall",
    "f1": "F1",
    "auc": "ROC AUC",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
}


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, Mapping):
        return f"{value['mean']:.{digits}f} ± {value['sd']:.{digits}f}"
    return f"{float(value):.{digits}f}"


def _retrieval(model: ModelEvaluation, metric: str, measure: str, k: int | None, digits: int = 3) -> str:
    numbers = model.retrieval.get(metric)
    if not isinstance(numbers, Mapping):
        return "—"
    value = numbers[measure] if k is None else numbers[measure].get(str(k))
    return _number(value, digits)


def _recorded_accuracy(model: ModelEvaluation) -> str:
    recorded = model.recorded
    if recorded is None:
        return "—"
    return f"accuracy {_number(recorded['accuracy'])} ({recorded['source']})"


# --- plots ------------------------------------------------------------------------------------


def _png(figure: Figure) -> str:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _image(figure: Figure, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{_png(figure)}">'


def _title(text: str, evaluation: Evaluation) -> str:
    return f"{text}\n(synthetic phantoms)" if evaluation.synthetic else text


def confusion_figure(model: ModelEvaluation, title: str) -> Figure:
    """Counts in each cell, shaded by the fraction of the true class (row)."""
    matrix = np.asarray(model.classification["confusion_matrix"], dtype=np.float64)
    labels = model.bundle.labels
    rows = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    side = 1.2 + 0.9 * len(labels)
    figure = Figure(figsize=(side + 1.2, side))
    axes = figure.add_subplot()
    shown = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(shown, ax=axes, fraction=0.046, label="share of the true class")
    for (row, column), count in np.ndenumerate(matrix):
        colour = "white" if shares[row, column] > 0.6 else "black"
        axes.text(column, row, f"{int(count)}", ha="center", va="center", color=colour)
    axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    return figure


def roc_figure(model: ModelEvaluation, title: str) -> Figure:
    """One ROC curve per class (one against the rest), with its AUC in the legend."""
    figure = Figure(figsize=(5, 4.5))
    axes = figure.add_subplot()
    for c, label in enumerate(model.bundle.labels):
        if label not in model.roc_curves:
            continue
        fpr, tpr = model.roc_curves[label]
        auc = model.classification["per_class"][label]["auc"]
        axes.plot(fpr, tpr, color=_PALETTE[c % len(_PALETTE)], label=f"{label} (AUC {auc:.3f})")
    axes.plot([0, 1], [0, 1], color="#999", linestyle=":", label="chance")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.01)
    axes.set_xlabel("false positive rate (1 - specificity)")
    axes.set_ylabel("true positive rate (sensitivity)")
    axes.set_title(title)
    axes.legend(loc="lower right", fontsize="small")
    return figure


def retrieval_figure(models: Sequence[ModelEvaluation], ks: Sequence[int], title: str) -> Figure:
    """P@k and NDCG@k against k: a line per model and metric (cosine solid, L2 dashed)."""
    figure = Figure(figsize=(10, 4))
    panels = figure.subplots(1, 2)
    for axes, measure, name in zip(panels, ("precision", "ndcg"), ("P@k", "NDCG@k"), strict=True):
        for m, model in enumerate(models):
            for metric, style, marker in (("cosine", "-", "o"), ("l2", "--", "s")):
                numbers = model.retrieval.get(metric)
                if not isinstance(numbers, Mapping):
                    continue
                values = [numbers[measure][str(k)] for k in ks]
                label = f"{model.name}: {metric}" if len(models) > 1 else metric
                colour = _PALETTE[m % len(_PALETTE)]
                axes.plot(ks, values, style, marker=marker, fillstyle="none", color=colour, label=label)
        axes.set_xscale("log")
        axes.set_xticks(list(ks), [str(k) for k in ks])
        axes.set_ylim(0, 1.02)
        axes.set_xlabel("k")
        axes.set_ylabel(name)
        axes.set_title(f"{name} against k")
        axes.legend(fontsize="small")
    figure.suptitle(title)
    return figure


def projection_figure(points: np.ndarray, labels: Sequence[str], order: Sequence[str], title: str) -> Figure:
    """A 2-D scatter of embeddings, coloured by label (in the model's label order)."""
    figure = Figure(figsize=(5, 4.5))
    axes = figure.add_subplot()
    names = np.asarray(labels)
    for c, label in enumerate(order):
        chosen = names == label
        if chosen.any():
            axes.scatter(
                points[chosen, 0],
                points[chosen, 1],
                s=12,
                alpha=0.75,
                color=_PALETTE[c % len(_PALETTE)],
                label=label,
            )
    axes.set_title(title)
    axes.set_xticks([])
    axes.set_yticks([])
    axes.legend(fontsize="small", markerscale=1.5)
    return figure


# --- HTML -------------------------------------------------------------------------------------


def render_html(evaluation: Evaluation) -> str:
    """The whole report as one self-contained HTML document."""
    first = evaluation.models[0]
    subject = ", ".join(model.name for model in evaluation.models)
    on = "synthetic phantoms" if evaluation.synthetic else str(evaluation.data.source)
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Precedent evaluation: {_e(subject)} on {_e(on)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        *(f'<div class="banner">{_e(banner)}</div>' for banner in evaluation.banners),
        f"<h1>Evaluation of {_e(subject)}{' on synthetic phantoms' if evaluation.synthetic else ''}</h1>",
        _header(evaluation),
        *(f'<div class="warning">{_e(warning)}</div>' for warning in evaluation.warnings),
        "<h2>Summary</h2>",
        _summary_table(evaluation),
    ]
    if len(evaluation.models) > 1 and any("cosine" in m.retrieval for m in evaluation.models):
        title = _title("Retrieval of every model", evaluation)
        parts.append(
            _image(retrieval_figure(evaluation.models, evaluation.ks, title), "retrieval, all models")
        )
    for model in evaluation.models:
        parts += _model_section(evaluation, model)
    parts += [_method(evaluation, first), "</body></html>"]
    return "\n".join(parts)


def _e(text: object) -> str:
    return html.escape(str(text))


def _table(head: Sequence[str] | None, rows: Sequence[Sequence[str]], caption: str | None = None) -> str:
    """A table whose first column names its rows; no head row when ``head`` is None."""
    lines = ["<table>"]
    if caption:
        lines.append(f"<caption>{_e(caption)}</caption>")
    if head is not None:
        lines.append("<tr>" + "".join(_cell("th", i, text) for i, text in enumerate(head)) + "</tr>")
    lines += ["<tr>" + "".join(_cell("td", i, text) for i, text in enumerate(row)) + "</tr>" for row in rows]
    lines.append("</table>")
    return "\n".join(lines)


def _cell(tag: str, column: int, text: str) -> str:
    kind = ' class="name"' if column == 0 else ""
    return f"<{tag}{kind}>{_e(text)}</{tag}>"


def _header(evaluation: Evaluation) -> str:
    data = evaluation.data
    counts = dict.fromkeys(data.labels, 0)
    for example in evaluation.examples:
        counts[example.label] += 1
    facts = [
        ("data set", f"{data.source} ({data.format}, {len(data.examples)} images)"),
        ("synthetic phantoms", "yes: results on phantoms, not patients" if evaluation.synthetic else "no"),
        ("split", f"{evaluation.split}: {evaluation.split_reason}"),
        ("evaluated images", ", ".join(f"{count} {label}" for label, count in counts.items())),
        ("date", evaluation.created.isoformat(timespec="seconds")),
    ]
    for model in evaluation.models:
        bundle = model.bundle
        trained = bundle.description.get("trained_at") or "not recorded"
        where = "trained by this evaluation" if model.trained_here else str(bundle.path)
        facts.append(
            (
                f"model {model.name}",
                f"id {bundle.id} · {bundle.architecture} · {bundle.input.size} px · labels "
                f"{', '.join(bundle.labels)} · trained {trained} · clinical use "
                f"{'yes' if bundle.clinical_use else 'no'} · {where}",
            )
        )
    return _table(None, facts)


def _summary_table(evaluation: Evaluation) -> str:
    head = ["", *(model.name for model in evaluation.models)]
    caption = "Models side by side" + (" — on synthetic phantoms" if evaluation.synthetic else "")
    return _table(head, [(name, *cells) for name, cells in summary_rows(evaluation)], caption)


def _model_section(evaluation: Evaluation, model: ModelEvaluation) -> list[str]:
    labels = model.bundle.labels
    phantoms = " (synthetic phantoms)" if evaluation.synthetic else ""
    metrics = model.classification
    per_class = [
        (
            label,
            *(_number(metrics["per_class"][label][m]) for m in _MEASURES),
            str(metrics["per_class"][label]["support"]),
        )
        for label in labels
    ]
    per_class.append(("macro", *(_number(metrics["macro"][m]) for m in _MEASURES), str(metrics["images"])))
    head = ("class", *(_MEASURES[m] for m in _MEASURES), "images")
    matrix_rows = [
        (label, *(str(v) for v in row))
        for label, row in zip(labels, metrics["confusion_matrix"], strict=True)
    ]
    parts = [
        f"<h2>{_e(model.name)}: {_e(model.bundle.architecture)}</h2>",
        f'<p class="note">Images and this model: {_e(model.relation)}.</p>',
        f"<h3>Classification{_e(phantoms)}</h3>",
        f"<p>accuracy <b>{_number(metrics['accuracy'])}</b> on {metrics['images']} images</p>",
        _table(head, per_class, "per class (one against the rest) and macro mean"),
        _table(
            ("true \\ predicted", *labels), matrix_rows, "confusion matrix (rows: true, columns: predicted)"
        ),
        _image(
            confusion_figure(model, _title(f"{model.name}: confusion matrix", evaluation)), "confusion matrix"
        ),
    ]
    if model.roc_curves:
        parts.append(
            _image(roc_figure(model, _title(f"{model.name}: ROC, one vs rest", evaluation)), "ROC curves")
        )
    parts += _recorded_section(model)
    parts += _retrieval_section(evaluation, model)
    parts += _projection_section(evaluation, model)
    return parts


def _recorded_section(model: ModelEvaluation) -> list[str]:
    recorded = model.recorded
    if recorded is None:
        return ["<h3>Recorded at training</h3>", '<p class="note">The bundle records no test metrics.</p>']
    labels = model.bundle.labels
    measures = [m for m in _MEASURES if m != "auc"]
    rows = [(label, *(_number(recorded["per_class"][label].get(m)) for m in measures)) for label in labels]
    rows.append(("macro", *(_number(recorded["macro"].get(m)) for m in measures)))
    spread = " (mean ± sd over folds)" if "folds" in recorded else ""
    return [
        "<h3>Recorded at training</h3>",
        f"<p>{_e(recorded['source'])}{_e(spread)}: accuracy <b>{_number(recorded['accuracy'])}</b>, "
        f"{recorded['images']} test images in all. No AUC: training records no probabilities.</p>",
        _table(("class", *(_MEASURES[m] for m in measures)), rows),
    ]


def _retrieval_section(evaluation: Evaluation, model: ModelEvaluation) -> list[str]:
    retrieval = model.retrieval
    phantoms = " (synthetic phantoms)" if evaluation.synthetic else ""
    parts = [f"<h3>Retrieval{_e(phantoms)}</h3>"]
    if "error" in retrieval:
        return [*parts, f'<p class="note">Not computed: {_e(retrieval["error"])}.</p>']
    head = ["k"]
    for metric in ("l2", "cosine"):
        head += [f"{metric}: P@k", f"{metric}: R@k", f"{metric}: NDCG@k", f"{metric}: ms/query"]
    rows = []
    for k in retrieval["ks"]:
        cells = [str(k)]
        for metric in ("l2", "cosine"):
            numbers = retrieval[metric]
            cells += [
                _number(numbers["precision"][str(k)]),
                _number(numbers["recall"][str(k)]),
                _number(numbers["ndcg"][str(k)]),
                _number(numbers["search_ms"][str(k)], 3),
            ]
        rows.append(cells)
    rows.append(
        ["mAP", _number(retrieval["l2"]["map"]), "", "", "", _number(retrieval["cosine"]["map"]), "", "", ""]
    )
    caption = (
        f"leave-one-out over {retrieval['items']} images ({retrieval['queries']} queries, "
        f"{retrieval['skipped']} without another image of their label); L2 and cosine side by side"
    )
    parts.append(_table(head, rows, caption))
    beyond = [k for k in retrieval["ks"] if k > retrieval["candidates"]]
    if beyond:
        parts.append(
            f'<p class="note">k = {", ".join(map(str, beyond))} exceeds the {retrieval["candidates"]} '
            "other images a query can find: P@k there is bounded by their number over k.</p>"
        )
    title = _title(f"{model.name}: retrieval", evaluation)
    parts.append(_image(retrieval_figure([model], retrieval["ks"], title), "P@k and NDCG@k against k"))
    return parts


def _projection_section(evaluation: Evaluation, model: ModelEvaluation) -> list[str]:
    projections = model.projections
    labels = [example.label for example in evaluation.examples]
    parts = ["<h3>Embedding space</h3>"]
    if projections.pca is not None:
        variance = " + ".join(f"{v:.1%}" for v in projections.pca_variance)
        title = _title(f"{model.name}: PCA ({variance} of the variance)", evaluation)
        parts.append(_image(projection_figure(projections.pca, labels, model.bundle.labels, title), "PCA"))
    if projections.tsne is not None:
        chosen = [labels[i] for i in projections.tsne_indices.tolist()]
        title = _title(f"{model.name}: t-SNE", evaluation)
        parts.append(_image(projection_figure(projections.tsne, chosen, model.bundle.labels, title), "t-SNE"))
    if projections.note:
        parts.append(f'<p class="note">{_e(projections.note)}.</p>')
    return parts


def _method(evaluation: Evaluation, first: ModelEvaluation) -> str:
    return (
        "<h2>How these numbers were computed</h2>"
        '<p class="note">Each image is decoded and preprocessed exactly as the node does when it '
        "serves the model (the same decoding, crop, resize and normalisation as training). The "
        "predicted class is the most probable one. Precision, recall (= sensitivity), F1 and "
        "specificity are per class, one class against the rest; macro values are their unweighted "
        "means over classes (precision, recall and F1 over the classes that occur, as scikit-learn "
        "does). ROC AUC is one against the rest from the class probability. Retrieval is leave-one-out: "
        "each evaluated image queries all the others through an exact index on the model's "
        "embedding (penultimate layer), L2 (Euclidean) or cosine; a result is relevant when it has "
        "the query's label. P@k divides by k, R@k by the number of relevant images, NDCG@k uses "
        "binary gains with log2 discounts, mAP averages the precision at each relevant image; "
        "search time is the mean wall time of one query. "
        f"Report made {_e(evaluation.created.isoformat(timespec='seconds'))} on {_e(first.device)}.</p>"
    )
