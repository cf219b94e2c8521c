"""TensorFlow's CPU allocator in a worker: BFC unless the environment says otherwise,
chosen before TensorFlow loads, and honoured by the TensorFlow installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from workers.tf_allocator import USE_BFC, prefer_bfc


def test_bfc_is_the_default_and_an_explicit_choice_wins() -> None:
    env: dict[str, str] = {}
    assert prefer_bfc(env) is True
    assert env == {USE_BFC: "true"}
    for value, expected in (
        ("false", False),
        ("0", False),
        ("1", True),
        ("TRUE", True),
        ("yes", False),
    ):
        env = {USE_BFC: value}
        assert prefer_bfc(env) is expected
        assert env == {USE_BFC: value}


# Imports the worker's app, then TensorFlow, and counts the page faults of calls that
# each allocate 256 MB: malloc maps such a block afresh at every call (65,536 faults
# of 4 KiB), BFC hands the same memory out again. The probes run with oneDNN's
# operations off: where TensorFlow turns them on (CPUs with AVX-512 VNNI, BF16 or AMX),
# its CPU allocator is oneDNN's, which pools large blocks whatever the variable says,
# and malloc's faults could not be told from BFC's.
PROBE = """
import json, os, resource, sys
import workers.app
loaded_before = "tensorflow" in sys.modules
import tensorflow as tf

def call():
    return float(tf.reduce_sum(tf.fill([64, 1024, 1024], 1.0)).numpy())

call()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    call()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
print(json.dumps({"env": os.environ["TF_CPU_ALLOCATOR_USE_BFC"], "tf_before": loaded_before,
                  "faults": faults}))
"""


def probe(**env: str) -> dict[str, object]:
    base = {k: v for k, v in os.environ.items() if k != USE_BFC}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**base, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0", **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_a_worker_reuses_tensorflows_cpu_memory_between_calls() -> None:
    bfc = probe()
    assert bfc["env"] == "true" and bfc["tf_before"] is False
    # Not a single re-mapped block: 256 MB would be 65,536 faults.
    assert isinstance(bfc["faults"], float) and bfc["faults"] < 5_000, bfc


def test_a_worker_told_to_keep_malloc_keeps_it() -> None:
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[always]" in thp.read_text(encoding="ascii"):
        # The kernel backs such a block with 2 MiB pages: 128 faults, not 65,536.
        pytest.skip("transparent huge pages are always on: malloc's faults are not counted")
    malloc = probe(**{USE_BFC: "false"})
    assert malloc["env"] == "false"
    # The control: with malloc, every call faults its 256 MB in again.
    assert isinstance(malloc["faults"], float) and malloc["faults"] > 50_000, malloc
