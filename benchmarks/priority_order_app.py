"""For benchmarks/jobctl.py only: the worker app with kombu's "priority" queue order,
to measure a queue per priority level against imgq's priority steps."""

from __future__ import annotations

from workers.app import app

app.conf.broker_transport_options = {
    **app.conf.broker_transport_options,
    "queue_order_strategy": "priority",
}
