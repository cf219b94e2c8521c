"""The ``imgq`` command line: a thin shell over ``producer.api`` (``workers`` for ``worker``)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from producer.api import Client, Job, JobTimeout
from producer.cli_common import (
    BadUsage,
    Group,
    WaitTimedOut,
    allow_missing_option,
    check_models,
    check_out,
    check_out_folder,
    check_redis_database,
    check_sources,
    chunk_size_option,
    format_for,
    format_option,
    gpu_id,
    job_id_option,
    models_option,
    name_option,
    no_progress_option,
    plural,
    print_status,
    print_top5_table,
    timeout_option,
    unfinished_note,
    user_errors,
    valid_job_id,
    write_results,
)
from producer.heads_cli import add_head_commands
from producer.jobctl_cli import cancel, jobs, wait
from producer.runner import RunPlan
from producer.runner import run as run_plan
from producer.vectors_cli import add_vector_commands
from producer.workers_cmd import workers
from shared import __version__
from shared.defaults import bounds_of, default_of
from shared.jobs import JobStatus
from shared.priority import DEFAULT_PRIORITY


@click.group(
    cls=Group,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="imgq")
def main() -> None:
    """Bulk image classification with TF Hub models on a Redis-backed Celery queue.

    Settings come from the environment (IMGQ_BROKER_URL, IMGQ_RESULT_BACKEND,
    IMGQ_MODELS_FILE, ...; see the README).
    """


@main.command()
@models_option(
    required=True, help="A model to serve (repeat for several). Its queue is imgq.<model>."
)
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(*bounds_of("worker_concurrency")),
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
    callback=gpu_id,
    help=(
        "The one GPU this process uses: an index or a UUID (sets CUDA_VISIBLE_DEVICES); "
        "the worker refuses to start without it. One process per GPU."
    ),
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

    with user_errors():
        # Settings, model names and the broker's database are checked before anything
        # loads: a mistake is one line, not a traceback after a model has loaded.
        client = Client()
        check_models(client, models)
        check_redis_database(client)
    if gpu is not None:
        if not any(Path("/dev").glob("nvidia[0-9]*")):
            raise BadUsage(f"--gpu {gpu}: this host has no NVIDIA GPU (no /dev/nvidia*)")
        # CUDA reads its device list from the environment only, before TensorFlow
        # starts; the worker refuses to start when TensorFlow still sees no GPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        os.environ["IMGQ_REQUIRE_GPU"] = "true"
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
@models_option(required=True, help="A model to classify every image with (repeat for several).")
@job_id_option
@name_option
@click.option(
    "--priority",
    type=click.IntRange(0, 9),
    default=DEFAULT_PRIORITY,
    show_default=True,
    help="0-9, higher runs first: workers take the most urgent job's tasks next.",
)
@chunk_size_option
@click.option("--wait", is_flag=True, help="Wait for the job to finish, with a progress bar.")
@timeout_option("With --wait: give up after SECONDS (exit 4).")
@click.option(
    "-o", "--out", default=None, help="With --wait: write the results to this file (or s3://)."
)
@format_option
@no_progress_option
@allow_missing_option
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
    allow_missing: bool,
    notify: str | None,
) -> None:
    """Submit SOURCES (files, folders, globs, @manifests, .csv/.jsonl, URLs, s3://) as one job.

    Without --wait the job id is printed alone on the last line, for scripts.
    """
    if out and not wait:
        raise click.UsageError("--out needs --wait (or use: imgq results JOB_ID --out FILE)")
    if timeout is not None and not wait:
        raise click.UsageError("--timeout goes with --wait")
    if fmt and not out:
        raise click.UsageError("--format says how --out is written: give --out FILE (or -)")
    check_out(out, fmt=fmt)
    check_sources(sources, allow_missing=allow_missing)
    with user_errors():
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
            f"submitted job {job.job_id}: {plural(job.record.total_images, 'image')} x "
            f"{len(job.record.models)} model(s), {job.record.n_chunks} chunk(s)",
            err=wait,
        )
        if not wait:
            click.echo(job.job_id)
            return
        try:
            status = job.wait(progress=not no_progress, timeout=timeout)
        except JobTimeout as exc:
            raise WaitTimedOut(f"{exc}; follow it with: imgq wait {job.job_id}") from exc
        print_status(status)
        if out:
            count = write_results(job, out, fmt)
            click.echo(f"wrote {plural(count, 'record')} to {out}", err=True)


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(job_id: str, as_json: bool) -> None:
    """Show a job's counts per model: total, done, failed, pending."""
    with user_errors():
        print_status(Client().job(job_id).status(), as_json=as_json)


@main.command()
@click.argument("job_id")
@click.option(
    "-o",
    "--out",
    default="-",
    show_default=True,
    help="File to write ('-': stdout), or s3://bucket/key (uploaded as it is written).",
)
@format_option
def results(job_id: str, out: str, fmt: str | None) -> None:
    """Write a job's results: one record per image and model."""
    check_out(out, fmt=format_for(out, fmt))
    with user_errors():
        job = Client().job(job_id)
        status = job.status()
        count = write_results(job, out, fmt)
        if not status.finished:
            click.echo(unfinished_note(status), err=True)
        if out != "-":
            click.echo(f"wrote {plural(count, 'record')} to {out}", err=True)


@main.command()
@click.argument("job_id")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def delete(job_id: str, yes: bool) -> None:
    """Delete a job: its results (PostgreSQL rows or Redis results) and its Redis records."""
    with user_errors():
        client = Client()
        client.check_deletable(job_id)
        if not yes:
            click.confirm(f"delete job {job_id} and all its results?", abort=True, err=True)
        deleted = client.delete(job_id)
    click.echo(
        f"deleted job {job_id}: {deleted.results} result(s) from {deleted.store}, "
        f"{deleted.keys} Redis key(s)",
        err=True,
    )


@main.command()
@click.argument("sources", nargs=-1)
@models_option(
    required=False,
    default=("resnet50",),
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
    callback=valid_job_id,
    metavar="JOB_ID",
    help="Finish an interrupted job (with the --state-dir it ran with).",
)
@job_id_option
@chunk_size_option
@click.option(
    "--show",
    type=click.IntRange(min=0),
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
@no_progress_option
@allow_missing_option
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
    allow_missing: bool,
) -> None:
    """Classify SOURCES in one command: Redis, a worker, the job, the results.

    Without IMGQ_BROKER_URL (or with --embedded) it starts a Redis and a worker of
    its own, runs the job through the normal queue, writes the results, and stops
    them again (also on Ctrl-C). With IMGQ_BROKER_URL it uses that broker and the
    workers already running there.
    """
    from shared.settings import get_settings

    check_out(out, fmt=format_for(out, fmt))
    check_out(report_path, option="--report")
    check_out_folder(state_dir, option="--state-dir")
    check_sources(sources, allow_missing=allow_missing)

    def finish(client: Client, job: Job, status: JobStatus) -> None:
        count = write_results(job, out, fmt)
        if report_path is not None:
            write_reports(client, job, report_path, None)
        if show > 0:
            print_top5_table(job, show)
        print_status(status)
        click.echo(f"wrote {plural(count, 'record')} to {out}", err=True)

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
    with user_errors():
        run_plan(plan, get_settings(), finish)


def write_reports(
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
        from producer.vectors_cli import duplicate_sections

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
                duplicates=duplicate_sections(job),
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
    check_out(out)
    check_out_folder(png_dir, option="--png-dir")
    with user_errors():
        client = Client()
        job = client.job(job_id)
        status = job.status()
        if not status.finished:
            click.echo(f"{unfinished_note(status)}; the report shows what is done", err=True)
        write_reports(client, job, out, png_dir, page_size, max_images)


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
@models_option(
    required=False,
    help="Models whose queues to report (default: every model in the registry).",
)
def metrics(port: int, address: str, models: tuple[str, ...]) -> None:
    """Serve Prometheus metrics: queue length per model, unacknowledged tasks, Redis memory,
    workers."""
    import time

    from prometheus_client import start_http_server
    from prometheus_client.core import REGISTRY

    from producer.metrics import LivenessCollector, QueueCollector
    from shared.liveness import BrokerRedis

    with user_errors():
        client = Client()
        registry = check_models(client, models)
        names = list(models) or list(registry)
        try:
            start_http_server(port, addr=address)
        except OSError as exc:  # a port in use, an address not on this host
            raise click.BadParameter(
                f"cannot serve metrics on {address}:{port}: {exc.strerror or exc}",
                param_hint="'--port' / '--address'",
            ) from exc
        REGISTRY.register(QueueCollector(BrokerRedis(client.app), names))
        REGISTRY.register(LivenessCollector(BrokerRedis(client.app)))
    click.echo(
        f"serving metrics for {', '.join(names)} on http://{address}:{port}/metrics", err=True
    )
    while True:
        time.sleep(3600)


for command in (jobs, wait, cancel, workers):
    main.add_command(command)

# imgq similar, duplicates, cache: the embedding models' commands, in their own module.
add_vector_commands(main, user_errors=user_errors)
# imgq train, export, models: your own labels, and the models listing.
add_head_commands(main, user_errors=user_errors)


if __name__ == "__main__":  # pragma: no cover
    import gc

    gc.freeze()  # as producer.entry does: no collection walks what the imports built
    main()
