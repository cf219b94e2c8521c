"""Every Redis connection imgq opens has a bounded connect timeout: after a Sentinel
failover, a dead master's address fails in seconds instead of stalling workers and
their heartbeats for the operating system's minutes."""

from __future__ import annotations

from typing import Any

from shared.celery_app import create_app, job_store_for
from shared.liveness import BrokerRedis
from shared.settings import Settings

SENTINELS = "sentinel://127.0.0.1:1/0;sentinel://127.0.0.1:2/0"


def connect_timeout(client: Any) -> Any:
    return client.connection_pool.connection_kwargs.get("socket_connect_timeout")


def test_the_broker_and_job_store_clients_get_the_connect_timeout(redis_url: str) -> None:
    app = create_app(Settings(broker_url=redis_url, redis_connect_timeout=3.5))
    broker = BrokerRedis(app)  # the heartbeats', the sweep's and the recovery's client
    try:
        assert connect_timeout(broker.client) == 3.5
        assert broker.client.ping()
    finally:
        broker.close()
    store = job_store_for(app)  # job records, claims, results (the result backend)
    assert connect_timeout(store.client) == 3.5
    assert Settings().redis_connect_timeout == 5.0  # the default


def test_sentinel_urls_bound_the_connect_to_sentinels_and_master() -> None:
    settings = Settings(broker_url=SENTINELS, redis_connect_timeout=2.0)
    app = create_app(settings)
    # The result backend's Sentinel client (nothing is connected yet): the master's
    # connections and the sentinels' own.
    client = app.backend.client
    assert connect_timeout(client) == 2.0
    for sentinel in client.connection_pool.sentinel_manager.sentinels:
        assert connect_timeout(sentinel) == 2.0
    # The broker: kombu's channel takes it from the transport options and gives it to
    # the sentinels too (it passes no sentinel_kwargs of its own).
    options = app.conf.broker_transport_options
    assert options["socket_connect_timeout"] == 2.0 and "sentinel_kwargs" not in options
    from kombu.transport.redis import SentinelChannel

    assert "socket_connect_timeout" in SentinelChannel.from_transport_options
