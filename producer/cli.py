"""The ``imgq`` command line: a thin shell over ``producer.api`` (``workers`` for ``worker``)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO, TypeVar

import click
import redis
from kombu.utils.url import maybe_sanitize_url

from producer.api import Client, Job, JobCancelledError, JobTimeout
from producer.jobctl_cli import JobWasCancelled, add_job_commands
from producer.output import write_parquet, write_records
from producer.runner import RunPlan
from producer.runner import run as run_plan
from producer.sources import SourceError
from shared import __version__
from shared.defaults import bounds_of, default_of
from shared.jobctl import state_of
from shared.jobs import JobError, JobStatus
from shared.priority import DEFAULT_PRIORITY
from shared.registry import RegistryError
from shared.results_store import ResultsStoreError

F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn the errors a user can cause into one clear line and exit status 1."""
    try:
        yield
    except JobCancelledError as exc:  # while waiting: someone cancelled the job
        raise JobWasCancelled(str(exc)) from exc
    except (JobError, RegistryError, SourceError, ValueError, ResultsStoreError) as exc:
        raise click.ClickException(str(exc)) from exc
    except redis.exceptions.ConnectionError as exc:
        from shared.settings import get_settings

        raise click.ClickException(
            f"cannot reach Redis at {maybe_sanitize_url(get_settings().broker_url)}: {exc} "
            "(set IMGQ_BROKER_URL, or start one: redis-server)"
        ) from exc


def _open_out(path: str | None) -> TextIO:
    if path in (None, "-"):
        return sys.stdout
    return open(path, "w", encoding="utf-8", newline="")


def _format_for(path: str | None, fmt: str | None) -> str:
    if fmt:
        return fmt
    if path and path.lower().endswith(".csv"):
        return "csv"
    if path and path.lower().endswith(".parquet"):
        return "parquet"
    return "jsonl"


def _write_results(job: Job, out: str | None, fmt: str | None) -> int:
    if _format_for(out, fmt) == "parquet":
        if out in (None, "-"):
            raise click.UsageError("--format parquet writes a file: give --out FILE.parquet")
        return write_parquet(job.iter_results(), str(out))
    stream = _open_out(out)
    try:
        count = write_records(job.iter_results(), stream, _format_for(out, fmt))  # type: ignore[arg-type]
    finally:
        if stream is not sys.stdout:
            stream.close()
    return count


def _print_status(status: JobStatus, *, as_json: bool) -> None:
    if as_json:
        click.echo(
            json.dumps(
                {
                    "job_id": status.job.job_id,
                    "name": status.job.name,
                    "state": state_of(status).value,
                    "priority": status.job.priority,
                    "finished": status.finished,
                    "created": status.job.created,
                    "images": status.job.total_images,
                    "models": {m: c.as_dict() for m, c in status.models.items()},
                }
            )
        )
        return
    state = state_of(status).value
    named = f" ({status.job.name})" if status.job.name else ""
    click.echo(f"job {status.job.job_id}{named}: {state}, {status.job.total_images} images")
    if status.cancelled:
        never = status.images_total - status.images_finished
        click.echo(f"cancelled: {never} image results never made (pending below)")
    click.echo(f"{'model':<20} {'total':>8} {'done':>8} {'failed':>8} {'pending':>8}")
    for model, c in status.models.items():
        click.echo(f"{model:<20} {c.total:>8} {c.done:>8} {c.failed:>8} {c.pending:>8}")


format_option = click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "csv", "parquet"]),
    default=None,
    help="Results format (default: from the file name, .csv or .parquet, else jsonl).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="imgq")
def main() -> None:
    """Bulk image classification with TF Hub models on a Redis-backed Celery queue.

    Settings come from the environment (IMGQ_BROKER_URL, IMGQ_RESULT_BACKEND,
    IMGQ_MODELS_FILE, ...; see the README).
    """


@main.command()
@click.option(
    "-m",
    "--model",
    "models",
    multiple=True,
    required=True,
    help="A model to serve (repeat for several). Its queue is imgq.<model>.",
)
@click.option(
    "-c",
    "--concurrency",
    type=int,
    default=None,
    help=(
        "Tasks run at once in this process (threads) "
        f"[env IMGQ_WORKER_CONCURRENCY; default {default_of('worker_concurrency')}]."
    ),
)
@click.option(
    "--pool",
    type=click.Choice(["threads", "solo"]),
    default="threads",
    show_default=True,
    help="Worker pool. TensorFlow does not survive fork.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(*bounds_of("batch_size")),
    default=None,
    help=f"Images per model call [env IMGQ_BATCH_SIZE; default {default_of('batch_size')}].",
)
@click.option(
    "--gpu",
    default=None,
    help="The GPU this process uses (sets CUDA_VISIBLE_DEVICES); one process per GPU.",
)
@click.option(
    "-n",
    "--hostname",
    default=None,
    help="Node name (default: imgq-<models>-<pid>@<host>); unique per worker.",
)
@click.option("-l", "--loglevel", default="INFO", show_default=True, help="Log level.")
def worker(
    models: tuple[str, ...],
    concurrency: int | None,
    pool: str,
    batch_size: int | None,
    gpu: str | None,
    hostname: str | None,
    loglevel: str,
) -> None:
    """Start a worker: load MODELs once, then consume their queues."""
    if gpu is not None:
        # CUDA reads its device list from the environment only, before TensorFlow starts.
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    name = hostname or f"imgq-{'-'.join(models)}-{os.getpid()}@%h"
    argv = [
        "-A",
        "workers.app",
        "worker",
        "--pool",
        pool,
        "--hostname",
        name,
        "--loglevel",
        loglevel,
        "--task-events",
        "--without-gossip",
        "--without-mingle",
    ]
    # imgq's own options go through Celery's custom worker options (workers.options).
    for model in models:
        argv += ["--model", model]
    if batch_size is not None:
        argv += ["--batch-size", str(batch_size)]
    if concurrency is not None:
        argv += ["--concurrency", str(concurrency)]
    from celery.bin.celery import celery as celery_command

    # The same entry point as `celery -A workers.app worker`; it exits with the
    # worker's status (app.worker_main would drop it).
    celery_command.main(args=argv, prog_name="celery", standalone_mode=True)


@main.command()
@click.argument("sources", nargs=-1, required=True)
@click.option(
    "-m",
    "--model",
    "models",
    multiple=True,
    required=True,
    help="A model to classify every image with (repeat for several).",
)
@click.option("--job-id", default=None, help="Choose the job id (letters, digits, - and _).")
@click.option("--name", default="", help="A name shown with the job (status, jobs, Flower).")
@click.option(
    "--priority",
    type=click.IntRange(0, 9),
    default=DEFAULT_PRIORITY,
    show_default=True,
    help="0-9, higher runs first: workers take the most urgent job's tasks next.",
)
@click.option(
    "--chunk-size",
    type=int,
    default=None,
    help=f"Image references per task [env IMGQ_CHUNK_SIZE; default {default_of('chunk_size')}].",
)
@click.option("--wait", is_flag=True, help="Wait for the job to finish, with a progress bar.")
@click.option("--timeout", type=float, default=None, help="With --wait: give up after SECONDS.")
@click.option("-o", "--out", default=None, help="With --wait: write the results to this file.")
@format_option
@click.option("--no-progress", is_flag=True, help="With --wait: no progress bar.")
@click.option(
    "--notify",
    metavar="URL",
    default=None,
    help="POST a JSON summary to URL once, when the job ends (signed with IMGQ_NOTIFY_SECRET).",
)
def submit(
    sources: tuple[str, ...],
    models: tuple[str, ...],
    job_id: str | None,
    name: str,
    priority: int,
    chunk_size: int | None,
    wait: bool,
    timeout: float | None,
    out: str | None,
    fmt: str | None,
    no_progress: bool,
    notify: str | None,
) -> None:
    """Submit SOURCES (files, folders, globs, @manifests, .csv/.jsonl, URLs) as one job.

    Without --wait the job id is printed alone on the last line, for scripts.
    """
    if out and not wait:
        raise click.UsageError("--out needs --wait (or use: imgq results JOB_ID --out FILE)")
    with _user_errors():
        client = Client()
        job = client.submit(
            list(sources),
            models=list(models),
            job_id=job_id,
            chunk_size=chunk_size,
            name=name,
            priority=priority,
            notify=notify,
        )
        click.echo(
            f"submitted job {job.job_id}: {job.record.total_images} images x "
            f"{len(job.record.models)} model(s), {job.record.n_chunks} chunk(s)",
            err=wait,
        )
        if not wait:
            click.echo(job.job_id)
            return
        try:
            status = job.wait(progress=not no_progress, timeout=timeout)
        except JobTimeout as exc:
            raise click.ClickException(f"{exc}; follow it with: imgq status {job.job_id}") from exc
        _print_status(status, as_json=False)
        if out:
            count = _write_results(job, out, fmt)
            click.echo(f"wrote {count} records to {out}", err=True)


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(job_id: str, as_json: bool) -> None:
    """Show a job's counts per model: total, done, failed, pending."""
    with _user_errors():
        _print_status(Client().job(job_id).status(), as_json=as_json)


@main.command()
@click.argument("job_id")
@click.option("-o", "--out", default="-", show_default=True, help="File to write ('-': stdout).")
@format_option
def results(job_id: str, out: str, fmt: str | None) -> None:
    """Write a job's results: one record per image and model."""
    with _user_errors():
        job = Client().job(job_id)
        status = job.status()
        count = _write_results(job, out, fmt)
        if not status.finished:
            pending = sum(c.pending for c in status.models.values())
            click.echo(f"job {job_id} is not finished: {pending} image results pending", err=True)
        if out != "-":
            click.echo(f"wrote {count} records to {out}", err=True)


@main.command()
@click.argument("job_id")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def delete(job_id: str, yes: bool) -> None:
    """Delete a job: its results (PostgreSQL rows or Redis results) and its Redis records."""
    from shared.jobs import check_job_id
    from shared.results_store import PostgresResultsStore, delete_job_records

    with _user_errors():
        check_job_id(job_id)
        client = Client()
        store = client.results_store
        try:
            record = client.store.get(job_id)
        except JobError:
            record = None
        if record is None and not store.keeps_records:
            raise click.ClickException(
                f"job {job_id!r} is unknown or has expired: nothing to delete"
            )
        if not yes:
            click.confirm(f"delete job {job_id} and all its results?", abort=True, err=True)
        if record is not None:
            results = store.delete_job(record)
            keys = delete_job_records(client.store, record)
        elif isinstance(store, PostgresResultsStore):  # Redis records expired, rows stay
            results = store.delete_rows(job_id)
            keys = 0
        else:
            results = keys = 0
        if record is None and results == 0:
            raise click.ClickException(f"job {job_id!r} is unknown: nothing to delete")
        click.echo(
            f"deleted job {job_id}: {results} result(s) from {store.kind}, {keys} Redis key(s)",
            err=True,
        )


def _print_table(job: Job, limit: int) -> None:
    """A short top-5 table for the first ``limit`` images."""
    from shared.labels import first_lemma

    shown: list[str] = []
    for record in job.iter_results():
        if record.image not in shown:
            if len(shown) == limit:
                break
            shown.append(record.image)
            click.echo(record.image)
        if record.error:
            click.echo(
                f"  {record.model:<16} error {record.error.code.value}: {record.error.message}"
            )
        else:
            cells = " | ".join(f"{first_lemma(p.label)} {p.score:.1%}" for p in record.top5)
            click.echo(f"  {record.model:<16} {cells}")


@main.command()
@click.argument("sources", nargs=-1)
@click.option(
    "-m",
    "--model",
    "models",
    multiple=True,
    default=("resnet50",),
    show_default=True,
    help="A model to classify every image with (repeat for several).",
)
@click.option(
    "-o",
    "--out",
    default="results.jsonl",
    show_default=True,
    help="Write the results to this file.",
)
@format_option
@click.option(
    "--embedded",
    is_flag=True,
    help="Start an embedded Redis and worker even when IMGQ_BROKER_URL is set.",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the embedded Redis data here (append-only file on), for --resume.",
)
@click.option(
    "--resume",
    "resume_id",
    default=None,
    metavar="JOB_ID",
    help="Finish an interrupted job (with the --state-dir it ran with).",
)
@click.option("--job-id", default=None, help="Choose the job id.")
@click.option(
    "--chunk-size",
    type=int,
    default=None,
    help=f"Image references per task [env IMGQ_CHUNK_SIZE; default {default_of('chunk_size')}].",
)
@click.option(
    "--show",
    type=int,
    default=10,
    show_default=True,
    help="Print a top-5 table for this many images (0: none).",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the HTML comparison report here.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def run(
    sources: tuple[str, ...],
    models: tuple[str, ...],
    out: str,
    fmt: str | None,
    embedded: bool,
    state_dir: Path | None,
    resume_id: str | None,
    job_id: str | None,
    chunk_size: int | None,
    show: int,
    report_path: Path | None,
    no_progress: bool,
) -> None:
    """Classify SOURCES in one command: Redis, a worker, the job, the results.

    Without IMGQ_BROKER_URL (or with --embedded) it starts a Redis and a worker of
    its own, runs the job through the normal queue, writes the results, and stops
    them again (also on Ctrl-C). With IMGQ_BROKER_URL it uses that broker and the
    workers already running there.
    """
    from shared.settings import get_settings

    def finish(client: Client, job: Job, status: JobStatus) -> None:
        count = _write_results(job, out, fmt)
        if report_path is not None:
            _write_reports(client, job, report_path, None)
        if show > 0:
            _print_table(job, show)
        _print_status(status, as_json=False)
        click.echo(f"wrote {count} records to {out}", err=True)

    plan = RunPlan(
        sources=sources,
        models=models,
        embedded=embedded,
        state_dir=state_dir,
        resume_id=resume_id,
        job_id=job_id,
        chunk_size=chunk_size,
        progress=not no_progress,
    )
    with _user_errors():
        run_plan(plan, get_settings(), finish)


def _write_reports(
    client: Client,
    job: Job,
    html: Path | None,
    png_dir: Path | None,
    page_size: int = 100,
    max_images: int | None = None,
) -> None:
    """The HTML page and PNG charts of a job, each one streaming pass over its results."""
    try:
        from producer.report import model_info, write_html_report, write_png_reports

        activations, label_sets = model_info(client.registry())
        record = job.record
        if html is not None:
            stats = write_html_report(
                job.iter_results(),
                html,
                activations=activations,
                label_sets=label_sets,
                page_size=page_size,
                title=f"imgq job {job.job_id}" + (f": {record.name}" if record.name else ""),
                models=record.models,
                window=record.chunk_size,
                max_images=max_images,
            )
            shown = f" (the first {stats.shown} shown)" if stats.shown < stats.images else ""
            click.echo(
                f"wrote report {html}: {stats.images} images{shown}, {stats.pages} page(s), "
                f"{stats.size_bytes / 1e6:.1f} MB",
                err=True,
            )
        if png_dir is not None:
            paths = write_png_reports(
                job.iter_results(),
                png_dir,
                activations=activations,
                models=record.models,
                total=record.total_images,
                window=record.chunk_size,
            )
            click.echo(f"wrote {len(paths)} PNG charts to {png_dir}", err=True)
    except ImportError as exc:  # Jinja2 or matplotlib missing: the `report` extra
        raise click.ClickException(
            f"reports need the report extra: pip install 'imgq[report]' ({exc})"
        ) from exc


@main.command()
@click.argument("job_id")
@click.option(
    "-o",
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write a self-contained HTML report here.",
)
@click.option(
    "--png-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write one PNG chart per image into this folder.",
)
@click.option(
    "--page-size",
    type=click.IntRange(1, 10_000),
    default=100,
    show_default=True,
    help="Images per page in the HTML report.",
)
@click.option(
    "--max-images",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Show at most N images in the HTML report's gallery; the summary still counts "
    "every image [default: all]. A page of more than a few tens of thousands of "
    "thumbnails gets heavy in a browser.",
)
def report(
    job_id: str, out: Path | None, png_dir: Path | None, page_size: int, max_images: int | None
) -> None:
    """Top-5 bar charts per image and model, and how much the models agree.

    The job's results are read as a stream, in bounded batches, from either
    results store, so memory does not grow with the job (the HTML file's size does).
    """
    if out is None and png_dir is None:
        raise click.UsageError("give --out FILE.html, --png-dir DIR, or both")
    with _user_errors():
        client = Client()
        job = client.job(job_id)
        if not job.status().finished:
            click.echo(f"job {job_id} is not finished: the report shows what is done", err=True)
        _write_reports(client, job, out, png_dir, page_size, max_images)


@main.command()
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=9808,
    show_default=True,
    help="Port to serve /metrics on.",
)
@click.option(
    "--address",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (0.0.0.0 in a container).",
)
@click.option(
    "-m",
    "--model",
    "models",
    multiple=True,
    help="Models whose queues to report (default: every model in the registry).",
)
def metrics(port: int, address: str, models: tuple[str, ...]) -> None:
    """Serve Prometheus metrics: queue length per model, unacknowledged tasks, workers."""
    import time

    from prometheus_client import start_http_server
    from prometheus_client.core import REGISTRY

    from producer.metrics import LivenessCollector, QueueCollector
    from shared.liveness import BrokerRedis

    with _user_errors():
        client = Client()
        names = list(models) or list(client.registry())
        REGISTRY.register(QueueCollector(client.store.client, names))
        REGISTRY.register(LivenessCollector(BrokerRedis(client.app)))
    start_http_server(port, addr=address)
    click.echo(
        f"serving metrics for {', '.join(names)} on http://{address}:{port}/metrics", err=True
    )
    while True:
        time.sleep(3600)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models(as_json: bool) -> None:
    """List the models in the registry (built-ins and IMGQ_MODELS_FILE)."""
    with _user_errors():
        registry = Client().registry()
    if as_json:
        click.echo(
            json.dumps(
                {
                    name: {
                        "handle": s.handle,
                        "input_size": list(s.input_size),
                        "activation": s.activation.value,
                        "labels": s.labels,
                        "queue": s.queue,
                        "description": s.description,
                    }
                    for name, s in registry.items()
                },
                indent=2,
            )
        )
        return
    for name, s in registry.items():
        h, w = s.input_size
        click.echo(
            f"{name}\n  handle:     {s.handle}\n  input:      {h}x{w} RGB [0, 1]\n"
            f"  activation: {s.activation.value}\n  labels:     {s.labels}\n"
            f"  queue:      {s.queue}"
        )
        if s.description:
            click.echo(f"  about:      {s.description}")


add_job_commands(
    main,
    print_status=lambda status: _print_status(status, as_json=False),
    write_results=_write_results,
    format_option=format_option,
)

# imgq workers: the liveness listing, in its own module.
from producer.workers_cmd import workers as _workers  # noqa: E402

main.add_command(_workers)


if __name__ == "__main__":  # pragma: no cover
    main()
