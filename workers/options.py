"""imgq's own worker options, through Celery's mechanism for custom worker options.

``celery -A workers.app worker --model NAME --batch-size N`` (and ``imgq worker``,
which runs that command) hands them to the worker as arguments: no environment
writes, no settings cache to clear. Without them the settings apply
(``IMGQ_WORKER_MODELS``, ``IMGQ_BATCH_SIZE``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import click
from celery import Celery
from celery.signals import celeryd_init

from shared.defaults import bounds_of, default_of
from shared.settings import Settings


@dataclass(frozen=True)
class WorkerOptions:
    """What the command line chose for this worker; None: the settings decide."""

    models: tuple[str, ...] = ()
    batch_size: int | None = None

    def apply(self, settings: Settings) -> Settings:
        """The settings with these options in place of the environment's."""
        update: dict[str, Any] = {}
        if self.models:
            update["worker_models"] = list(self.models)
        if self.batch_size is not None:
            update["batch_size"] = self.batch_size
        return settings.model_copy(update=update) if update else settings


_chosen = WorkerOptions()


def add_worker_options(app: Celery) -> None:
    """Add ``--model`` and ``--batch-size`` to ``celery worker`` for this app."""
    low, high = bounds_of("batch_size")
    app.user_options["worker"].add(
        click.Option(
            ["--model", "imgq_models"],
            multiple=True,
            help="imgq: a model to serve (repeat for several) [env IMGQ_WORKER_MODELS].",
        )
    )
    app.user_options["worker"].add(
        click.Option(
            ["--batch-size", "imgq_batch_size"],
            type=click.IntRange(low, high),
            default=None,
            help=(
                "imgq: largest batch per model call [env IMGQ_BATCH_SIZE; default "
                f"{default_of('batch_size')}]."
            ),
        )
    )


@celeryd_init.connect
def _remember(options: dict[str, Any] | None = None, **_: Any) -> None:
    """Keep this worker's options; the worker takes them before it loads its models."""
    global _chosen
    options = options or {}
    _chosen = WorkerOptions(
        models=tuple(options.get("imgq_models") or ()),
        batch_size=options.get("imgq_batch_size"),
    )


def worker_options() -> WorkerOptions:
    """The options this worker process was started with."""
    return _chosen
