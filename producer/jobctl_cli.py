"""``imgq jobs``, ``imgq wait`` and ``imgq cancel``: managing jobs from a script or a shell.

Exit codes (also in the README): 0 done; 1 another error (Redis unreachable, ...);
2 a usage error (bad option value); 3 no such job (unknown, expired or a malformed
id); 4 ``wait`` timed out; 5 the job was cancelled (``wait``); 6 the job had already
finished (``cancel``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click
import redis

from producer.api import Client, Job, JobCancelledError, JobTimeout
from shared.jobctl import JobFinishedError, JobState, JobSummary
from shared.jobs import JobError, JobStatus

EXIT_NO_SUCH_JOB = 3
EXIT_TIMEOUT = 4
EXIT_CANCELLED = 5
EXIT_FINISHED = 6


class NoSuchJob(click.ClickException):
    """Unknown, expired or malformed job id."""

    exit_code = EXIT_NO_SUCH_JOB


class WaitTimedOut(click.ClickException):
    """``wait`` gave up after its timeout."""

    exit_code = EXIT_TIMEOUT


class JobWasCancelled(click.ClickException):
    """``wait`` found the job cancelled."""

    exit_code = EXIT_CANCELLED


class JobAlreadyFinished(click.ClickException):
    """``cancel`` found the job finished."""

    exit_code = EXIT_FINISHED


@contextmanager
def _job_errors() -> Iterator[None]:
    """Map job errors to their exit codes; Redis errors to one line and exit 1."""
    try:
        yield
    except JobFinishedError as exc:
        raise JobAlreadyFinished(str(exc)) from exc
    except JobError as exc:
        raise NoSuchJob(str(exc)) from exc
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise click.ClickException(f"cannot reach Redis: {exc}") from exc


def _age(seconds: float) -> str:
    """A short age: 42s, 5m, 3h, 2d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def print_jobs(jobs: list[JobSummary], *, as_json: bool) -> None:
    """The jobs as a table, or one JSON array."""
    now = time.time()
    if as_json:
        click.echo(json.dumps([j.as_dict(now) for j in jobs]))
        return
    click.echo(
        f"{'job':<26} {'name':<20} {'created (UTC)':<19} {'state':<9} {'pri':>3} "
        f"{'total':>7} {'done':>7} {'failed':>7} {'pending':>7} {'age':>5}  models"
    )
    for j in jobs:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(j.created))
        name = j.name if len(j.name) <= 20 else j.name[:19] + "~"
        click.echo(
            f"{j.job_id:<26} {name:<20} {created:<19} {j.state.value:<9} {j.priority:>3} "
            f"{j.total:>7} {j.done:>7} {j.failed:>7} {j.pending:>7} "
            f"{_age(now - j.created):>5}  {','.join(j.models)}"
        )


def add_job_commands(
    group: click.Group,
    *,
    print_status: Callable[[JobStatus], None],
    write_results: Callable[[Job, str | None, str | None], int],
    format_option: Callable[[Callable[..., None]], Callable[..., None]],
) -> None:
    """Add ``jobs``, ``wait`` and ``cancel`` to the ``imgq`` group."""

    @group.command()
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output (a JSON array).")
    @click.option(
        "-n",
        "--limit",
        type=click.IntRange(1, 100_000),
        default=20,
        show_default=True,
        help="Show at most this many jobs.",
    )
    @click.option(
        "--state",
        "states",
        type=click.Choice([s.value for s in JobState]),
        multiple=True,
        help="Only jobs in this state (repeat for several).",
    )
    def jobs(as_json: bool, limit: int, states: tuple[str, ...]) -> None:
        """List recent jobs, newest first: counts, state (queued, running, finished, cancelled)."""
        with _job_errors():
            found = Client().jobs(limit=limit, states={JobState(s) for s in states} or None)
        print_jobs(found, as_json=as_json)

    @group.command()
    @click.argument("job_id")
    @click.option("-o", "--out", default=None, help="When finished, write the results here.")
    @format_option
    @click.option(
        "--timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=None,
        help="Give up after SECONDS (exit 4).",
    )
    @click.option("--no-progress", is_flag=True, help="No progress bar.")
    def wait(
        job_id: str, out: str | None, fmt: str | None, timeout: float | None, no_progress: bool
    ) -> None:
        """Wait for a job submitted earlier, with a progress bar; exit 0 when it finished.

        Lost tasks are sent again as with submit --wait. Exit 3: no such job, 4: timed
        out, 5: the job was cancelled.
        """
        with _job_errors():
            job = Client().job(job_id)
            try:
                status = job.wait(progress=not no_progress, timeout=timeout)
            except JobTimeout as exc:
                raise WaitTimedOut(str(exc)) from exc
            except JobCancelledError as exc:
                raise JobWasCancelled(f"{exc}; what was done: imgq results {job_id}") from exc
            print_status(status)
            if out:
                count = write_results(job, out, fmt)
                click.echo(f"wrote {count} records to {out}", err=True)

    @group.command()
    @click.argument("job_id")
    def cancel(job_id: str) -> None:
        """Cancel a job: none of its tasks starts from now on, results so far are kept.

        A batch already in a model finishes. Exit 3: no such job, 6: already finished.
        """
        with _job_errors():
            outcome = Client().cancel(job_id)
        status = outcome.status
        never = status.images_total - status.images_finished
        if outcome.already:
            click.echo(f"job {job_id} was already cancelled: {never} image results never made")
            return
        click.echo(
            f"cancelled job {job_id}: {outcome.removed_tasks} queued task(s) removed, "
            f"{status.images_finished}/{status.images_total} image results kept, "
            f"{never} not classified (a batch already in a model may still finish)"
        )
