"""The commands of embedding models: ``imgq similar``, ``imgq duplicates``, ``imgq cache
purge``, and how an embedding job's results are written (JSONL, Parquet, NumPy).

Thin shells over ``producer.api`` (``Job.similar``, ``Job.duplicates``,
``Job.embeddings``) and ``shared.result_cache``; registered on the ``imgq`` group by
:func:`add_vector_commands`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import click

from producer.api import Client, Job

UserErrors = Callable[[], AbstractContextManager[None]]


@contextmanager
def _no_vectors() -> Iterator[None]:
    """A job (or image) without stored vectors: one line, not a traceback."""
    try:
        yield
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0]) if exc.args else "no vectors") from None


def embedding_dims(job: Job) -> dict[str, int]:
    """The job's embedding models and their vector widths (those with vectors stored)."""
    registry = job.client.registry()
    models = [m for m in job.record.models if m in registry and registry[m].is_embedding]
    if not models:
        return {}
    vectors = job.client.vector_store(models[0])
    return {s.model: s.dim for s in vectors.sets(job.job_id) if s.model in models}


def write_embedding_results(job: Job, out: str | None, fmt: str) -> int | None:
    """Write an embedding job's results to ``out`` in ``fmt``; None when the job has no
    embedding model (the caller writes the classifier records).

    ``npy``: the N x D float32 matrix of the images that have a vector and their
    names (``X.names.txt`` beside ``X.npy``); ``parquet``: every record, the vector
    as a fixed-size float32 list; ``jsonl``: every record, ``embedding`` and ``dim``
    in place of ``top5``. One embedding model per file for ``npy`` and ``parquet``.
    """
    from producer.output import write_npy, write_parquet

    registry = job.client.registry()
    embedding = [m for m in job.record.models if m in registry and registry[m].is_embedding]
    if not embedding:
        if fmt == "npy":
            raise click.UsageError("--format npy is for embedding models' vectors")
        return None
    if fmt == "csv":
        raise click.UsageError(
            "embedding models' results go to --format jsonl, parquet or npy, not csv"
        )
    if fmt in ("npy", "parquet"):
        if len(job.record.models) != 1:
            raise click.UsageError(
                f"--format {fmt} takes one embedding model's results; this job ran "
                f"{', '.join(job.record.models)}: use jsonl"
            )
        if out in (None, "-"):
            raise click.UsageError(f"--format {fmt} writes a file: give --out FILE.{fmt}")
    if fmt == "jsonl":
        return None
    from shared.s3 import is_s3_url

    model = embedding[0]
    dims = embedding_dims(job)
    if fmt == "parquet":
        if is_s3_url(str(out)):
            from producer.s3_output import S3Writer

            with S3Writer(str(out)) as sink:
                return write_parquet(job.iter_results(), sink, dim=dims.get(model, 0))  # type: ignore[arg-type]
        return write_parquet(job.iter_results(), str(out), dim=dims.get(model, 0))
    if is_s3_url(str(out)):
        raise click.UsageError(
            "--format npy writes a local file (and its names beside it): give a path"
        )
    vectors = job.client.vector_store(model)
    n = vectors.count(job.job_id, model)
    batches = ((b.images, b.matrix) for b in vectors.iter_batches(job.job_id, model))
    return write_npy(batches, str(out), n=n, dim=dims.get(model, 0))


def _job_and_model(client: Client, job_id: str, model: str | None) -> tuple[Job, str]:
    job = client.job(job_id)
    return job, job.embedding_model(model)


def add_vector_commands(main: click.Group, *, user_errors: UserErrors) -> None:
    """Register ``similar``, ``duplicates`` and ``cache`` on the ``imgq`` group."""

    @main.command()
    @click.argument("query")
    @click.option("--job", "job_id", required=True, help="The job whose images to search.")
    @click.option(
        "-m",
        "--model",
        default=None,
        help="The embedding model (default: the job's only embedding model).",
    )
    @click.option(
        "-k", type=click.IntRange(1, 1000), default=10, show_default=True, help="How many."
    )
    @click.option("--json", "as_json", is_flag=True, help="A JSON list, nearest first.")
    def similar(query: str, job_id: str, model: str | None, k: int, as_json: bool) -> None:
        """The K images of a job nearest to QUERY by cosine similarity of their embeddings.

        QUERY is an image of the job (as submitted) or an image file or URL, which a
        worker of the model embeds through the queue first.
        """
        with user_errors(), _no_vectors():
            client = Client()
            job, name = _job_and_model(client, job_id, model)
            near = job.similar(query, model=name, k=k)
        if as_json:
            click.echo(json.dumps([{"image": n.image, "similarity": n.similarity} for n in near]))
            return
        for n in near:
            click.echo(f"{n.similarity:.4f}  {n.image}")

    @main.command()
    @click.argument("job_id")
    @click.option(
        "-m",
        "--model",
        default=None,
        help="The embedding model (default: the job's only embedding model).",
    )
    @click.option(
        "--threshold",
        type=click.FloatRange(-1.0, 1.0),
        default=0.95,
        show_default=True,
        help="Cosine similarity at or above which two images are near-duplicates.",
    )
    @click.option(
        "-k",
        type=click.IntRange(1, 1000),
        default=10,
        show_default=True,
        help="Neighbours looked at per image.",
    )
    @click.option("--json", "as_json", is_flag=True, help="A JSON list of groups.")
    def duplicates(job_id: str, model: str | None, threshold: float, k: int, as_json: bool) -> None:
        """Groups of near-duplicate images of a job, largest first: images linked, pair by
        pair among each image's K nearest, by a cosine similarity of at least THRESHOLD."""
        with user_errors(), _no_vectors():
            client = Client()
            job, name = _job_and_model(client, job_id, model)
            groups = job.duplicates(model=name, threshold=threshold, k=k)
        if as_json:
            click.echo(json.dumps([g.images for g in groups]))
            return
        if not groups:
            click.echo(f"no near-duplicates at cosine similarity {threshold}", err=True)
        for i, g in enumerate(groups, 1):
            click.echo(f"group {i}: {len(g.images)} images")
            for image in g.images:
                click.echo(f"  {image}")

    @main.group()
    def cache() -> None:
        """The result cache: models' outputs kept per image (PostgreSQL results store)."""

    @cache.command()
    @click.option("-m", "--model", default=None, help="Only this model's entries.")
    def purge(model: str | None) -> None:
        """Delete the cached results (of every model, or of one)."""
        from shared.result_cache import ResultCache

        with user_errors():
            client = Client()
            if client.results_store.kind != "postgresql":
                raise click.ClickException(
                    "the result cache lives in the PostgreSQL results store: set IMGQ_RESULTS_URL"
                )
            deleted = ResultCache(client.settings.results_url).purge(model)
        click.echo(f"deleted {deleted} cached result(s)", err=True)


def duplicate_sections(job: Job, *, threshold: float = 0.95) -> list[Any]:
    """The report's near-duplicates sections: one per embedding model of the job that
    has vectors (``producer.report.DuplicatesSection``)."""
    from producer.report import DuplicatesSection

    sections = []
    for model in embedding_dims(job):
        groups = job.duplicates(model=model, threshold=threshold)
        sections.append(DuplicatesSection(model, threshold, [g.images for g in groups]))
    return sections
