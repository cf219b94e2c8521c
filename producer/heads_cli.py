"""``imgq train``, ``imgq export`` and ``imgq models`` (the registry and your own labels'
models, their versions and metrics, ``imgq models delete``)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import click

from producer.api import Client
from producer.cli_common import BadUsage, no_progress_option, plural, timeout_option


def add_head_commands(
    main: click.Group, *, user_errors: Callable[..., AbstractContextManager[None]]
) -> None:
    """Register the commands of your own labels on ``main``."""

    @main.command()
    @click.argument("data")
    @click.option("--base", required=True, help="The embedding model whose vectors it learns on.")
    @click.option("--name", required=True, help="The model's name; saved as NAME@1, NAME@2 ...")
    @click.option(
        "--val-fraction",
        type=click.FloatRange(0.05, 0.5),
        default=0.2,
        show_default=True,
        help="Images held out for validation (stratified) when every label has 10 or more; "
        "otherwise the accuracy is cross-validated.",
    )
    @click.option("--seed", type=int, default=0, show_default=True, help="Split and fit seed.")
    @click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
    @click.option(
        "--report",
        "report_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Also write the metrics as an HTML page (accuracy, per label, confusion matrix).",
    )
    @timeout_option("Give up waiting for the vectors after SECONDS (exit 4).")
    @no_progress_option
    def train(
        data: str,
        base: str,
        name: str,
        val_fraction: float,
        seed: int,
        as_json: bool,
        report_path: Path | None,
        timeout: float | None,
        no_progress: bool,
    ) -> None:
        """Train a model of your own labels on DATA: a folder with one folder of images per
        label, or a CSV/JSONL manifest of image,label.

        The images' vectors are computed by the BASE model's workers (one embedding job);
        a linear classifier is fitted on them and saved as the next version of NAME, which
        `imgq submit --model NAME` then uses like any model.
        """
        from producer.own_labels import train_model
        from producer.training import (
            TrainingError,
            TrainingUsageError,
            format_metrics,
            write_report,
        )

        if report_path is not None and report_path.parent and not report_path.parent.is_dir():
            raise click.BadParameter(
                f"folder {str(report_path.parent)!r} does not exist", param_hint="'--report'"
            )
        with user_errors():
            client = Client()
            try:
                outcome = train_model(
                    client,
                    data,
                    base=base,
                    name=name,
                    val_fraction=val_fraction,
                    seed=seed,
                    progress=not no_progress,
                    timeout=timeout,
                    on_job=lambda jid: click.echo(f"computing the vectors: job {jid}", err=True),
                )
            except TrainingUsageError as exc:  # the command line names the wrong thing
                raise BadUsage(str(exc)) from exc
            except TrainingError as exc:
                raise click.ClickException(str(exc)) from exc
        for item in outcome.left_out:
            click.echo(
                f"left out {item.image} ({item.label}): {item.code}: {item.message}", err=True
            )
        if report_path is not None:
            write_report(report_path, outcome.info.ref, outcome.fit.metrics)
            click.echo(f"wrote {report_path}", err=True)
        if as_json:
            click.echo(json.dumps(outcome.as_dict(), indent=2, ensure_ascii=False))
        else:
            click.echo(format_metrics(outcome.fit.metrics))
        click.echo(
            f"saved model {outcome.info.ref}: {plural(len(outcome.info.labels), 'label')}, "
            f"{plural(outcome.info.n_train, 'image')}, on {outcome.info.base}",
            err=as_json,
        )

    @main.command()
    @click.argument("model")
    @click.option(
        "--out",
        required=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="The folder to write (must not exist, or be empty).",
    )
    def export(model: str, out: Path) -> None:
        """Write MODEL (NAME or NAME@VERSION) as a standalone TensorFlow SavedModel: its
        base model and head, float32 RGB in [0, 1] in, probabilities out, for TF Serving
        or tf.saved_model.load without imgq."""
        with user_errors():
            client = Client()
            head = client.heads.get(model)
            spec = client.registry().get(head.info.base)
            if spec is None:
                raise click.ClickException(
                    f"model {head.ref} was trained on {head.info.base!r}, which this host's "
                    "models file does not name"
                )
            try:
                from workers.export import ExportError, export_head
            except ImportError as exc:
                raise click.ClickException(
                    f"imgq export needs TensorFlow on this host (pip install 'imgq[worker]'): {exc}"
                ) from exc
            try:
                path = export_head(
                    spec,
                    head.weights,
                    head.bias,
                    head.labels,
                    out,
                    hub_cache_dir=client.settings.tfhub_cache_dir.expanduser(),
                    name=head.ref,
                )
            except ExportError as exc:
                raise click.ClickException(str(exc)) from exc
        click.echo(f"exported {head.ref} ({head.info.base} + its head) to {path}")

    @main.group(invoke_without_command=True)
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @click.pass_context
    def models(ctx: click.Context, as_json: bool) -> None:
        """List the models: the registry's (built-ins and IMGQ_MODELS_FILE) and those of
        your own labels (imgq train), every version with its metrics."""
        if ctx.invoked_subcommand is not None:
            return
        with user_errors():
            client = Client()
            registry = client.registry()
            heads = client.heads.all_versions()
        if as_json:
            listing: dict[str, Any] = {
                name: {
                    "handle": s.handle,
                    "kind": s.kind.value,
                    "input_size": list(s.input_size),
                    "activation": s.activation.value,
                    "labels": s.labels,
                    "queue": s.queue,
                    "description": s.description,
                }
                for name, s in registry.items()
            }
            for info in heads:
                listing[info.ref] = {"kind": "own labels", **info.as_dict()}
            click.echo(json.dumps(listing, indent=2, ensure_ascii=False))
            return
        for name, s in registry.items():
            h, w = s.input_size
            output = (
                "the pooled feature vector (embedding)"
                if s.is_embedding
                else f"top-5, activation {s.activation.value}, labels {s.labels}"
            )
            click.echo(
                f"{name}\n  handle:     {s.handle}\n  input:      {h}x{w} RGB [0, 1]\n"
                f"  output:     {output}\n  queue:      {s.queue}"
            )
            if s.description:
                click.echo(f"  about:      {s.description}")
        latest: dict[str, int] = {}
        for info in heads:
            latest[info.name] = max(latest.get(info.name, 0), info.version)
        for info in heads:
            metrics = info.metrics
            accuracy = metrics.get("accuracy")
            shown = (
                f"{accuracy:.3f} ({metrics.get('evaluation', '?')})"
                if isinstance(accuracy, int | float)
                else "-"
            )
            created = time.strftime("%Y-%m-%d %H:%M", time.localtime(info.created))
            tag = f"  (latest: {info.name})" if latest[info.name] == info.version else ""
            click.echo(
                f"{info.ref}{tag}\n  own labels: {plural(len(info.labels), 'label')}: "
                f"{_short(info.labels)}\n  base:       {info.base}\n"
                f"  trained:    {created} on {plural(info.n_train, 'image')}\n"
                f"  accuracy:   {shown}"
            )

    @models.command("delete")
    @click.argument("model")
    @click.option("--yes", is_flag=True, help="Do not ask; needed to delete every version.")
    def delete_model(model: str, yes: bool) -> None:
        """Delete MODEL: NAME@VERSION, or NAME (every version, with --yes). Jobs that
        already name a deleted version keep their results; new ones cannot use it."""
        with user_errors():
            client = Client()
            if "@" not in model and not yes:
                versions = client.heads.versions(model)
                if versions and not click.confirm(
                    f"delete every version of {model} ({len(versions)})?", default=False
                ):
                    raise click.ClickException("nothing deleted")
            deleted = client.heads.delete(model)
        click.echo(f"deleted {', '.join(deleted)}")


def _short(labels: tuple[str, ...], limit: int = 6) -> str:
    shown = ", ".join(labels[:limit])
    return shown + (f" ... (+{len(labels) - limit})" if len(labels) > limit else "")
