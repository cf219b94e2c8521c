"""What every ``imgq`` command shares: its exit codes, the one place where errors
become one line on stderr and an exit code, the options several commands take, and
how results and statuses are written.

Exit codes (also in the README): 0 done; 1 another error (Redis unreachable, ...);
2 a usage error (a bad option value or setting); 3 no such job (unknown, expired or a
malformed id); 4 a wait timed out; 5 the job was cancelled (``wait``, ``submit
--wait``, ``run``); 6 the job had already finished (``cancel``).
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import click
import redis
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url

from producer.api import Client, Job, JobCancelledError, JobTimeout, RedisFullError
from producer.output import write_parquet, write_records
from producer.s3_output import S3Writer, check_s3_out
from producer.sources import SourceError, missing_sources
from shared.defaults import bounds_of, default_of
from shared.devices import check_gpu_id
from shared.heads import HeadNameError
from shared.jobctl import JobFinishedError, check_name, state_of
from shared.jobs import JobError, JobStatus, ListingCancelled, check_job_id
from shared.notify import NotifyError
from shared.registry import ModelSpec, RegistryError, get_model
from shared.results_store import ResultsStoreError
from shared.s3 import S3Error, is_s3_url
from shared.settings import SettingsError

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NO_SUCH_JOB = 3
EXIT_TIMEOUT = 4
EXIT_CANCELLED = 5
EXIT_FINISHED = 6


class NoSuchJob(click.ClickException):
    """Unknown, expired or malformed job id."""

    exit_code = EXIT_NO_SUCH_JOB


class WaitTimedOut(click.ClickException):
    """A wait gave up after its timeout."""

    exit_code = EXIT_TIMEOUT


class JobWasCancelled(click.ClickException):
    """A wait found the job cancelled."""

    exit_code = EXIT_CANCELLED


class JobAlreadyFinished(click.ClickException):
    """``cancel`` found the job finished."""

    exit_code = EXIT_FINISHED


class BadUsage(click.ClickException):
    """A usage error found after the options were parsed: a setting (``IMGQ_*``) imgq
    cannot use, an unknown model, a source that cannot be expanded."""

    exit_code = EXIT_USAGE


def gpu_id(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """``--gpu``: one GPU, an index or a UUID (a list such as ``0,1`` is a usage error)."""
    if value is None:
        return None
    try:
        return check_gpu_id(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def one_line(message: str) -> str:
    """The message on one line (a message from a library may span several)."""
    return " ".join(message.split())


# Raised for "imgq" or "imgq COMMAND" without arguments where that shows the help
# (click 8.2 and later); its message is the whole help text.
_NO_ARGS_IS_HELP: tuple[type[Exception], ...] = tuple(
    c for c in (getattr(click.exceptions, "NoArgsIsHelpError", None),) if c is not None
)


class Group(click.Group):
    """The ``imgq`` group: every usage error is one line on stderr and exit status 2,
    naming the option as the user wrote it, the value and what is allowed (where click
    would print the usage, a hint and a blank line first); other errors one line too."""

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> Any:  # type: ignore[override]
        """Run the command; exit with its status."""
        extra.pop("standalone_mode", None)
        try:
            result = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.UsageError as exc:
            if isinstance(exc, _NO_ARGS_IS_HELP):  # "imgq" alone: the help, as click shows it
                exc.show()
                sys.exit(exc.exit_code)
            where = exc.ctx.command_path if exc.ctx is not None else "imgq"
            hint = f" (see: {where} --help)" if exc.ctx is not None else ""
            click.echo(f"Error: {one_line(exc.format_message())}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"Error: {one_line(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(EXIT_ERROR)
        sys.exit(result if isinstance(result, int) else 0)


def _broker_url() -> str:
    from shared.settings import get_settings

    return str(maybe_sanitize_url(get_settings().broker_url))


def _vector_store_error() -> type[Exception]:
    """``shared.vectors``' error. Imported when an error reaches the clause that names it
    (an except clause's types are evaluated then), not at every command's start:
    ``shared.vectors`` brings NumPy."""
    from shared.vectors import VectorStoreError

    return VectorStoreError


@contextmanager
def user_errors(*, unknown_job: int = EXIT_ERROR) -> Iterator[None]:
    """Turn the errors a user can cause into one line on stderr and an exit code.

    ``unknown_job`` is the exit code of an unknown, expired or malformed job id: 3 for
    the job-control commands (``jobs``, ``wait``, ``cancel``), 1 for the others.
    """
    try:
        yield
    except SettingsError as exc:
        raise BadUsage(str(exc)) from exc
    except (JobCancelledError, ListingCancelled) as exc:  # someone cancelled the job
        raise JobWasCancelled(str(exc)) from exc
    except JobTimeout as exc:
        raise WaitTimedOut(str(exc)) from exc
    except JobFinishedError as exc:
        raise JobAlreadyFinished(str(exc)) from exc
    except HeadNameError as exc:  # not a model name or NAME@VERSION
        raise BadUsage(str(exc)) from exc
    except JobError as exc:
        if unknown_job == EXIT_NO_SUCH_JOB:
            raise NoSuchJob(str(exc)) from exc
        raise click.ClickException(str(exc)) from exc
    except RegistryError as exc:  # an unknown model name, or a bad IMGQ_MODELS_FILE
        raise BadUsage(str(exc)) from exc
    except SourceError as exc:  # a glob without a match, a manifest without a column ...
        raise BadUsage(str(exc)) from exc
    except NotifyError as exc:  # a --notify URL imgq will not POST to
        raise BadUsage(str(exc)) from exc
    except (ValueError, ResultsStoreError, S3Error, _vector_store_error()) as exc:
        raise click.ClickException(str(exc)) from exc
    except RedisFullError as exc:  # a submit into a full Redis: what to do, in one line
        raise click.ClickException(str(exc)) from exc
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise click.ClickException(
            f"cannot reach Redis at {_broker_url()}: {exc} "
            "(set IMGQ_BROKER_URL, or start one: redis-server)"
        ) from exc
    except (redis.exceptions.ResponseError, OperationalError) as exc:
        if "DB index" in str(exc):  # the URL's /N names a database Redis does not have
            raise BadUsage(
                f"IMGQ_BROKER_URL={_broker_url()!r} is refused by Redis: {exc} "
                "(a Redis has databases 0-15 unless configured otherwise)"
            ) from exc
        if isinstance(exc, OperationalError):  # kombu's wrapper of a connection error
            raise click.ClickException(f"cannot reach Redis at {_broker_url()}: {exc}") from exc
        raise click.ClickException(f"Redis at {_broker_url()} answered: {exc}") from exc


def check_redis_database(client: Client) -> None:
    """Raise Redis's error for a URL whose database Redis does not have (``user_errors``
    makes it a usage error); a Redis that is not up yet is left to the command's own
    retries."""
    try:
        client.store.client.ping()
    except redis.exceptions.ResponseError as exc:
        if "DB index" in str(exc):
            raise
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        return


# --- options several commands share --------------------------------------------------
def check_models(client: Client, models: Sequence[str]) -> dict[str, ModelSpec]:
    """The registry, after checking that every name in ``models`` is in it; a usage
    error naming ``--model`` otherwise."""
    registry = client.registry()
    for model in models:
        try:
            get_model(registry, model)
        except RegistryError as exc:
            raise click.BadParameter(str(exc), param_hint="'-m' / '--model'") from exc
    return registry


def models_option(*, required: bool, help: str, default: tuple[str, ...] | None = None) -> Any:
    """``-m/--model`` (repeatable)."""
    return click.option(
        "-m",
        "--model",
        "models",
        multiple=True,
        required=required,
        default=default,
        show_default=default is not None,
        help=help,
    )


format_option = click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "csv", "parquet", "npy"]),
    default=None,
    help=(
        "Results format (default: from the file name, .csv, .parquet or .npy, else jsonl); "
        "npy: an embedding model's N x D float32 vectors, their names in FILE.names.txt."
    ),
)

no_progress_option = click.option("--no-progress", is_flag=True, help="No progress bar.")


def valid_job_id(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A click callback: the job id, or a usage error saying what a job id may hold."""
    if value is None:
        return None
    try:
        return check_job_id(value)
    except JobError as exc:
        raise click.BadParameter(str(exc), ctx, param) from exc


def _valid_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return check_name(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from exc


job_id_option = click.option(
    "--job-id",
    default=None,
    callback=valid_job_id,
    help="Choose the job id (1-64 letters, digits, - and _).",
)

name_option = click.option(
    "--name",
    default="",
    callback=_valid_name,
    help="A name shown with the job (status, jobs, Flower).",
)

chunk_size_option = click.option(
    "--chunk-size",
    type=click.IntRange(*bounds_of("chunk_size")),
    default=None,
    help=f"Image references per task [env IMGQ_CHUNK_SIZE; default {default_of('chunk_size')}].",
)


allow_missing_option = click.option(
    "--allow-missing",
    is_flag=True,
    help="Submit local paths that do not exist here anyway (workers on another host may "
    "see them; the others get not_found records).",
)


def check_sources(sources: tuple[str, ...], *, allow_missing: bool) -> None:
    """Refuse local sources that do not exist (a mistyped folder or file), in one line,
    unless ``allow_missing``."""
    if allow_missing or not sources:
        return
    missing = missing_sources(sources)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise click.BadParameter(
            f"no such file or folder: {shown} (--allow-missing submits it anyway; a worker "
            "that does not see it answers not_found)",
            param_hint="SOURCES",
        )


def timeout_option(help: str) -> Any:
    """``--timeout SECONDS``, more than 0."""
    return click.option(
        "--timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=None,
        metavar="SECONDS",
        help=help,
    )


# --- where results go, checked before any work starts ---------------------------------
def check_out(out: str | Path | None, *, option: str = "--out", fmt: str | None = None) -> None:
    """Refuse an output path that cannot be written, before any work starts: a
    folder, a file in a folder that does not exist or cannot be written, or Parquet
    to stdout. ``-`` and None (stdout, or nothing) pass. A results file given as a
    string may be ``s3://bucket/key``: its bucket must answer (reports, given as
    paths, are always local files)."""
    if out is None or str(out) == "-":
        if fmt in ("parquet", "npy"):
            raise click.UsageError(f"--format {fmt} writes a file: give --out FILE.{fmt}")
        return
    if isinstance(out, str) and is_s3_url(out):  # results streamed to a bucket (s3_output)
        check_s3_out(out, option=option)
        return
    path = Path(out).expanduser()
    if path.is_dir():
        raise click.BadParameter(f"{str(out)!r} is a folder; give a file name", param_hint=option)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise click.BadParameter(
            f"{str(out)!r}: the folder {str(folder)!r} does not exist (create it first)",
            param_hint=option,
        )
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise click.BadParameter(f"{str(out)!r} cannot be written (permissions)", param_hint=option)


def check_out_folder(folder: Path | None, *, option: str) -> None:
    """Refuse an output folder whose parent does not exist, or a file in its place
    (the folder itself is created)."""
    if folder is None:
        return
    path = folder.expanduser()
    if path.exists() and not path.is_dir():
        raise click.BadParameter(f"{str(folder)!r} is a file, not a folder", param_hint=option)
    parent = path.parent if str(path.parent) else Path(".")
    if not path.exists() and not parent.is_dir():
        raise click.BadParameter(
            f"{str(folder)!r}: the folder {str(parent)!r} does not exist (create it first)",
            param_hint=option,
        )


def plural(n: int, word: str) -> str:
    """``1 image``, ``2 images``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# --- results and statuses ------------------------------------------------------------
def format_for(path: str | None, fmt: str | None) -> str:
    """The output format: the one given, else from the file name, else JSONL."""
    if fmt:
        return fmt
    if path and path.lower().endswith(".csv"):
        return "csv"
    if path and path.lower().endswith(".parquet"):
        return "parquet"
    if path and path.lower().endswith(".npy"):
        return "npy"
    return "jsonl"


def _open_out(path: str | None) -> TextIO:
    if path in (None, "-"):
        return sys.stdout
    return open(path, "w", encoding="utf-8", newline="")


def write_results(job: Job, out: str | None, fmt: str | None) -> int:
    """Write a job's results to ``out`` (None or '-': stdout); how many records (an
    embedding model's: see ``producer.vectors_cli.write_embedding_results``)."""
    from producer.vectors_cli import write_embedding_results

    written = write_embedding_results(job, out, format_for(out, fmt))
    if written is not None:
        return written
    if format_for(out, fmt) == "parquet":
        if out in (None, "-"):
            raise click.UsageError("--format parquet writes a file: give --out FILE.parquet")
        if is_s3_url(str(out)):
            with S3Writer(str(out)) as sink:
                return write_parquet(job.iter_results(), sink)  # type: ignore[arg-type]
        return write_parquet(job.iter_results(), str(out))
    if out is not None and is_s3_url(out):
        with S3Writer(out) as sink:
            buffered = io.BufferedWriter(sink, buffer_size=1024 * 1024)
            text = io.TextIOWrapper(buffered, encoding="utf-8", newline="")
            count = write_records(job.iter_results(), text, format_for(out, fmt))  # type: ignore[arg-type]
            text.flush()
            text.detach().detach()
        return count
    stream = _open_out(out)
    try:
        count = write_records(job.iter_results(), stream, format_for(out, fmt))  # type: ignore[arg-type]
    finally:
        if stream is not sys.stdout:
            stream.close()
    return count


def print_status(status: JobStatus, *, as_json: bool = False) -> None:
    """A job's counts per model, as a table or one JSON object."""
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
                    "listing_error": status.job.listing_error or None,
                    "models": {m: c.as_dict() for m, c in status.models.items()},
                    "callback": status.callback and status.callback.as_dict(),
                }
            )
        )
        return
    state = state_of(status).value
    named = f" ({status.job.name})" if status.job.name else ""
    so_far = " so far" if status.job.listing else ""
    click.echo(
        f"job {status.job.job_id}{named}: {state}, "
        f"{plural(status.job.total_images, 'image')}{so_far}"
    )
    if status.job.listing_error:
        click.echo(status.job.listing_error)
    if status.cancelled:
        never = status.images_total - status.images_finished
        click.echo(f"cancelled: {never} image results never made (pending below)")
    click.echo(f"{'model':<20} {'total':>8} {'done':>8} {'failed':>8} {'pending':>8}")
    for model, c in status.models.items():
        click.echo(f"{model:<20} {c.total:>8} {c.done:>8} {c.failed:>8} {c.pending:>8}")


def unfinished_note(status: JobStatus) -> str:
    """What a reader of an unfinished job's results is told: pending, or cancelled."""
    job_id = status.job.job_id
    if status.cancelled:
        never = status.images_total - status.images_finished
        return (
            f"job {job_id} was cancelled: these are the {status.images_finished} image "
            f"results made before the cancel; {never} were never classified"
        )
    pending = sum(c.pending for c in status.models.values())
    return (
        f"job {job_id} is not finished: {pending} image results pending "
        f"(imgq wait {job_id} follows it to the end)"
    )


def print_top5_table(job: Job, limit: int) -> None:
    """A short top-5 table for the first ``limit`` images (labels as the label set
    writes them, up to the first comma)."""
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
            cells = " | ".join(
                f"{p.label.split(',', 1)[0].strip()} {p.score:.1%}" for p in record.top5
            )
            click.echo(f"  {record.model:<16} {cells}")
