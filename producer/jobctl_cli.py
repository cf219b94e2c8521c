"""``imgq jobs``, ``imgq wait`` and ``imgq cancel``: managing jobs from a script or a shell.

Exit codes (``producer.cli_common``, also in the README): 0 done; 1 another error
(Redis unreachable, ...); 2 a usage error (bad option value); 3 no such job (unknown,
expired or a malformed id); 4 ``wait`` timed out; 5 the job was cancelled (``wait``);
6 the job had already finished (``cancel``).
"""

from __future__ import annotations

import json
import time

import click

from producer.api import Client, JobCancelledError
from producer.cli_common import (
    EXIT_NO_SUCH_JOB,
    JobWasCancelled,
    check_out,
    format_for,
    format_option,
    no_progress_option,
    plural,
    print_status,
    timeout_option,
    user_errors,
    write_results,
)
from shared.jobctl import JobState, JobSummary


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


@click.command()
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
    """List recent jobs, newest first: counts, state (listing, queued, running, finished,
    cancelled)."""
    with user_errors(unknown_job=EXIT_NO_SUCH_JOB):
        found = Client().jobs(limit=limit, states={JobState(s) for s in states} or None)
    print_jobs(found, as_json=as_json)


@click.command()
@click.argument("job_id")
@click.option("-o", "--out", default=None, help="When finished, write the results here.")
@format_option
@timeout_option("Give up after SECONDS (exit 4).")
@no_progress_option
def wait(
    job_id: str, out: str | None, fmt: str | None, timeout: float | None, no_progress: bool
) -> None:
    """Wait for a job submitted earlier, with a progress bar; exit 0 when it finished.

    Lost tasks are sent again as with submit --wait. Exit 3: no such job, 4: timed
    out, 5: the job was cancelled.
    """
    if fmt and not out:
        raise click.UsageError("--format says how --out is written: give --out FILE (or -)")
    check_out(out, fmt=format_for(out, fmt) if out else None)
    with user_errors(unknown_job=EXIT_NO_SUCH_JOB):
        job = Client().job(job_id)
        try:
            status = job.wait(progress=not no_progress, timeout=timeout)
        except JobCancelledError as exc:
            raise JobWasCancelled(f"{exc}; what was done: imgq results {job_id}") from exc
        print_status(status)
        if out:
            count = write_results(job, out, fmt)
            click.echo(f"wrote {plural(count, 'record')} to {out}", err=True)


@click.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel a job: none of its tasks starts from now on, results so far are kept.

    A batch already in a model finishes. Exit 3: no such job, 6: already finished.
    """
    with user_errors(unknown_job=EXIT_NO_SUCH_JOB):
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
