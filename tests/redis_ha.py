"""A throwaway Redis with Sentinel: one master, one replica, three sentinels, each a real
``redis-server`` process on a free loopback port."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis

from tests.conftest import RedisServer, free_port, redis_server_binary

# The default name (IMGQ_SENTINEL_MASTER), so that helpers building their own
# settings, like the launcher's readiness ping, find the master too.
MASTER_NAME = "mymaster"


class SentinelGroup:
    """A master, a replica and three sentinels watching them (quorum 2)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.master = RedisServer(directory / "master", appendonly=True)
        self.replica = RedisServer(directory / "replica", appendonly=True)
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """The ``sentinel://`` URL naming all three sentinels."""
        return ";".join(f"sentinel://127.0.0.1:{p}/0" for p in self.sentinel_ports)

    def start(self) -> SentinelGroup:
        """Start everything and wait until the sentinels know the master and its replica."""
        self.master.start()
        self.replica.start()
        redis.Redis(port=self.replica.port).replicaof("127.0.0.1", self.master.port)
        for port in self.sentinel_ports:
            conf = self.directory / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n"
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
                f"sentinel failover-timeout {MASTER_NAME} 5000\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n",
                encoding="utf-8",
            )
            self.sentinels.append(
                subprocess.Popen(
                    [redis_server_binary(), str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                states = [
                    redis.Redis(port=p).sentinel_master(MASTER_NAME) for p in self.sentinel_ports
                ]
                replicas = redis.Redis(port=self.sentinel_ports[0]).sentinel_slaves(MASTER_NAME)
                if (
                    all(int(s["num-other-sentinels"]) >= 2 for s in states)
                    and replicas
                    and redis.Redis(port=self.replica.port).info("replication")[
                        "master_link_status"
                    ]
                    == "up"
                ):
                    return self
            except redis.exceptions.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the sentinels did not find the master and its replica")
            time.sleep(0.2)

    def master_port(self) -> int:
        """The port of the master the sentinels name now."""
        _, port = redis.Redis(port=self.sentinel_ports[0]).sentinel_get_master_addr_by_name(
            MASTER_NAME
        )
        return int(port)

    def stop(self) -> None:
        """Stop every process."""
        for proc in self.sentinels:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
        self.replica.stop()
        self.master.stop()
