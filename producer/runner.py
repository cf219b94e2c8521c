"""``imgq run``'s orchestration: choose the broker (an embedded Redis and worker, or
the one configured), submit or resume the job, wait for it, then hand it to the
caller to write out. The command line only parses options and writes files.

A job with an embedding model needs the PostgreSQL results store (vectors never go
to Redis): with the embedded Redis and no ``IMGQ_RESULTS_URL``, the run also starts
an embedded PostgreSQL with pgvector (``producer.embedded_pg``), its data beside the
Redis's in ``--state-dir`` (so ``--resume`` finds it) or in a temporary folder."""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import click
from kombu.utils.url import maybe_sanitize_url

from producer.api import Client, Job
from producer.embedded import EmbeddedError, LocalStack
from producer.embedded_pg import EmbeddedPostgres, EmbeddedPostgresError
from shared.jobs import JobStatus
from shared.registry import get_model, load_registry
from shared.settings import Settings

# Writes the results (and report, table, counts) of a finished job.
Finish = Callable[[Client, Job, JobStatus], None]


@dataclass(frozen=True)
class RunPlan:
    """What ``imgq run`` was asked to do."""

    sources: Sequence[str]
    models: Sequence[str]
    embedded: bool = False
    state_dir: Path | None = None
    resume_id: str | None = None
    job_id: str | None = None
    chunk_size: int | None = None
    progress: bool = True


def uses_embedded(plan: RunPlan, settings: Settings) -> bool:
    """True when the run starts its own Redis and worker (no IMGQ_BROKER_URL, or --embedded)."""
    return plan.embedded or "broker_url" not in settings.model_fields_set


def check_plan(plan: RunPlan, settings: Settings) -> None:
    """Refuse option combinations that cannot work, with a usage error."""
    if bool(plan.sources) == bool(plan.resume_id):
        raise click.UsageError("give SOURCES to classify, or --resume JOB_ID (not both)")
    embedded = uses_embedded(plan, settings)
    if plan.resume_id and embedded and plan.state_dir is None:
        raise click.UsageError("--resume with the embedded Redis needs the --state-dir it ran with")
    if plan.state_dir is not None and not embedded:
        raise click.UsageError("--state-dir is for the embedded Redis (IMGQ_BROKER_URL is set)")


def resume_hint(job_id: str, plan: RunPlan, embedded: bool) -> str:
    """How an interrupted run can be finished, or why it cannot."""
    if not embedded:
        return f"resume with  imgq run --resume {job_id}"
    if plan.state_dir is None:
        return (
            f"job {job_id} ran on a temporary Redis and cannot be resumed; "
            "run with --state-dir DIR to be able to resume"
        )
    return f"resume with  imgq run --resume {job_id} --state-dir {shlex.quote(str(plan.state_dir))}"


def run(plan: RunPlan, settings: Settings, finish: Finish) -> None:
    """Run the job of ``plan`` to its end on the chosen broker, then call ``finish``."""
    check_plan(plan, settings)
    if not uses_embedded(plan, settings):
        click.echo(
            f"using the broker at {maybe_sanitize_url(settings.broker_url)} and the workers "
            "already running there",
            err=True,
        )
        _run_job(plan, settings, Client(settings), None, finish)
        return
    postgres = (
        EmbeddedPostgres(plan.state_dir / "postgres" if plan.state_dir else None)
        if needs_embedded_postgres(plan, settings)
        else None
    )
    try:
        update: dict[str, object] = {"result_backend": None}
        worker_env: dict[str, str] = {}
        if postgres is not None:
            url = postgres.start()
            click.echo(
                "started an embedded PostgreSQL with pgvector for the vectors; data in "
                f"{postgres.directory if plan.state_dir else 'a temporary folder'}",
                err=True,
            )
            update["results_url"] = url
            worker_env["IMGQ_RESULTS_URL"] = url
        with LocalStack(plan.state_dir, worker_env=worker_env) as stack:
            click.echo(
                f"started an embedded Redis ({stack.url}); data in "
                f"{plan.state_dir if plan.state_dir else 'a temporary folder'}",
                err=True,
            )
            local = settings.model_copy(update={"broker_url": stack.url, **update})
            _run_job(plan, settings, Client(local), stack, finish)
    except (EmbeddedError, EmbeddedPostgresError) as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        if postgres is not None:
            postgres.stop()


def needs_embedded_postgres(plan: RunPlan, settings: Settings) -> bool:
    """True when the run's models include an embedding model and no results store is
    configured (IMGQ_RESULTS_URL unset or ``redis`` by default)."""
    if "results_url" in settings.model_fields_set:
        return False
    models = plan.models
    if plan.resume_id and plan.state_dir is not None:
        # The models of a resumed job are in its Redis: its PostgreSQL folder says it.
        return (plan.state_dir / "postgres").is_dir()
    registry = load_registry(settings.models_file)
    return any(m in registry and registry[m].is_embedding for m in models)


def _run_job(
    plan: RunPlan, settings: Settings, client: Client, stack: LocalStack | None, finish: Finish
) -> None:
    if plan.resume_id:
        job = client.job(plan.resume_id)
        if stack is not None:
            stack.purge_queues(job.record.models)
            stack.start_worker(job.record.models)
        sent = job.resend_unfinished()
        click.echo(f"resuming job {job.job_id}: {sent} unfinished task(s) queued again", err=True)
    else:
        if stack is not None:
            registry = client.registry()
            for name in plan.models:  # unknown model names fail before a worker starts
                spec = get_model(registry, name)
                if "://" in spec.handle:
                    click.echo(
                        f"model {name}: {spec.handle}, downloaded once into "
                        f"{settings.tfhub_cache_dir.expanduser()} (TFHUB_CACHE_DIR)",
                        err=True,
                    )
            stack.start_worker(plan.models)
            click.echo(
                f"started a worker for {', '.join(plan.models)}: it loads the models first",
                err=True,
            )
        job = client.submit(
            list(plan.sources),
            models=list(plan.models),
            job_id=plan.job_id,
            chunk_size=plan.chunk_size,
        )
        n = job.record.total_images
        click.echo(
            f"job {job.job_id}: {n} image{'' if n == 1 else 's'} x "
            f"{len(job.record.models)} model(s)",
            err=True,
        )
    try:
        status = job.wait(
            progress=plan.progress, check=stack.check_worker if stack is not None else None
        )
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: {resume_hint(job.job_id, plan, stack is not None)}", err=True)
        raise SystemExit(130) from None
    finish(client, job, status)
