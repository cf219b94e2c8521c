"""``imgq workers``: the workers that keep a heartbeat, alive or dead, and what was
recovered from the dead ones."""

from __future__ import annotations

import json
import time

import click

from producer.api import Client
from producer.cli_common import user_errors


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def workers(as_json: bool) -> None:
    """List workers (alive, or dead: heartbeat expired) and the tasks recovered."""
    with user_errors():
        listing = Client().workers()
    if as_json:
        out = {
            "workers": [
                {"id": w.worker_id, "name": w.name, "alive": w.alive, **w.info}
                for w in listing.workers
            ],
            "tasks_recovered": listing.tasks_recovered,
            "tasks_resent": listing.tasks_resent,
            "recoveries": listing.recoveries,
        }
        click.echo(json.dumps(out, indent=2))
        return
    now = time.time()
    rows = [("WORKER", "STATE", "MODELS", "PID", "LAST SEEN")]
    for w in listing.workers:
        seen = float(w.info.get("seen", now))
        rows.append(
            (
                w.name,
                ("paused" if w.info.get("store_unavailable") else "alive") if w.alive else "dead",
                ",".join(w.models),
                str(w.info.get("pid", "?")),
                f"{max(0.0, now - seen):.0f} s ago",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(n) for c, n in zip(row, widths, strict=True)).rstrip())
    if len(rows) == 1:
        click.echo("(no worker has a heartbeat)")
    click.echo(
        f"tasks put back from dead workers: {listing.tasks_recovered}; "
        f"lost tasks sent again by the sweep: {listing.tasks_resent}"
    )
