"""``imgq workers``: the workers that keep a heartbeat, alive or dead, and what was
recovered from the dead ones."""

from __future__ import annotations

import json
import time

import click
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url

from shared.liveness import RECOVERED_KEY, RESENT_KEY, BrokerRedis, Liveness
from shared.settings import get_settings


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def workers(as_json: bool) -> None:
    """List workers (alive, or dead: heartbeat expired) and the tasks recovered."""
    from producer.api import Client
    from producer.cli import _user_errors

    with _user_errors():
        broker = BrokerRedis(Client().app)
        try:
            liveness = Liveness(broker.client, timeout=0)
            listed = liveness.workers()
            values = broker.client.mget([RECOVERED_KEY, RESENT_KEY])
            recovered, resent = (int(v or 0) for v in values)
            events = liveness.recoveries()
        except OperationalError as exc:  # kombu's wrapper of a connection error
            raise click.ClickException(
                f"cannot reach Redis at {maybe_sanitize_url(get_settings().broker_url)}: {exc}"
            ) from exc
        finally:
            broker.close()
    if as_json:
        out = {
            "workers": [
                {"id": w.worker_id, "name": w.name, "alive": w.alive, **w.info} for w in listed
            ],
            "tasks_recovered": recovered,
            "tasks_resent": resent,
            "recoveries": events,
        }
        click.echo(json.dumps(out, indent=2))
        return
    now = time.time()
    rows = [("WORKER", "STATE", "MODELS", "PID", "LAST SEEN")]
    for w in listed:
        seen = float(w.info.get("seen", now))
        rows.append(
            (
                w.name,
                "alive" if w.alive else "dead",
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
        f"tasks put back from dead workers: {recovered}; "
        f"lost tasks sent again by the sweep: {resent}"
    )
