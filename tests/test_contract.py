"""The queue contract: task ids, the task message on the wire, and the result records
a real worker runtime builds, checked against the pydantic models the producer reads
them with (so the two cannot drift)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from shared.contract import (
    ClassifyMessage,
    ErrorDict,
    PredictionDict,
    ResultDict,
    embedding_result,
    error_result,
    parse_task_id,
    task_id,
)
from shared.schemas import ErrorCode, ErrorInfo, ImageRef, Prediction, ResultRecord

LABELS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta"]


def test_task_ids_round_trip() -> None:
    tid = task_id("job-1", "resnet50", 12)
    assert tid == "job-1.resnet50.000012"
    assert parse_task_id(tid) == ("job-1", "resnet50", 12)
    with pytest.raises(ValueError):
        parse_task_id("job-1.resnet50")


def test_message_names_its_chunk_and_round_trips() -> None:
    message = ClassifyMessage(job_id="job-1", model="m", chunk=3, size=512)
    args = message.to_args()
    # No image list: the worker reads the chunk from the job record.
    assert args == ["job-1", "m", 3]
    assert message.task_id == "job-1.m.000003"
    assert message.argsrepr() == "(job='job-1', name='', model='m', chunk=3, images=512)"
    named = "(job='job-1', name='cats', model='m', chunk=3, images=512)"
    assert message.argsrepr(name="cats") == named
    # What the worker gets back after the JSON trip through the broker (the size is
    # for monitoring only and does not travel).
    back = ClassifyMessage.from_args(*json.loads(json.dumps(args)))
    assert (back.job_id, back.model, back.chunk, back.images) == ("job-1", "m", 3, None)


def test_the_older_inline_form_still_round_trips() -> None:
    refs = (ImageRef(src="a.jpg", ref="/d/a.jpg"), ImageRef(src="http://h/b", ref="http://h/b"))
    message = ClassifyMessage(job_id="job-1", model="m", chunk=3, images=refs)
    args = message.to_args()
    assert args == ["job-1", "m", 3, [["a.jpg", "/d/a.jpg"], "http://h/b"]]
    assert message.argsrepr() == "(job='job-1', name='', model='m', chunk=3, images=2)"
    assert ClassifyMessage.from_args(*json.loads(json.dumps(args))) == message


@pytest.mark.parametrize(
    "args",
    [
        ("job", "m", 0, "not a list"),
        ("job", "m", 0, [["only-src"]]),
        ("job", "m", 0, [["a", "b", "c"]]),
        ("job", "m", 0, [[None, "/d/a.jpg"]]),
        ("job", "m", -1, [["a", "/d/a"]]),
        ("job", None, 0, [["a", "/d/a"]]),
        ("job", "m", -1),
        ("job", "m", "three"),
        (None, "m", 0),
    ],
)
def test_malformed_messages_are_refused(args: tuple[Any, ...]) -> None:
    with pytest.raises(ValueError):
        ClassifyMessage.from_args(*args)


def test_wire_record_types_name_the_model_fields() -> None:
    assert list(ResultDict.__annotations__) == list(ResultRecord.model_fields)
    assert list(PredictionDict.__annotations__) == list(Prediction.model_fields)
    assert list(ErrorDict.__annotations__) == list(ErrorInfo.model_fields)


def assert_matches_contract(record: ResultDict) -> None:
    """The record parses as a ResultRecord and dumps back to the very same JSON."""
    parsed = ResultRecord.model_validate(record)
    assert json.dumps(parsed.to_json_dict()) == json.dumps(record)
    # The wire order, less the keys of the other kind of model.
    other = {"embedding", "dim"} if "top5" in record else {"top5"}
    assert list(record) == [k for k in ResultDict.__annotations__ if k not in other]


def test_an_embedding_record_carries_its_vector_in_place_of_top5() -> None:
    vector = np.array([0.25, -1.5, 3.0e-7, 12.0], np.float32)
    record = embedding_result("job-1", "a.jpg", "feat", vector)
    assert record["embedding"] == [0.25, -1.5, float(np.float32(3.0e-7)), 12.0]
    assert record["dim"] == 4 and "top5" not in record
    assert_matches_contract(record)
    parsed = ResultRecord.model_validate(record)
    assert parsed.ok and parsed.is_embedding and parsed.top5 == []
    # float32 values survive the JSON round trip exactly.
    back = np.array(json.loads(json.dumps(parsed.to_json_dict()))["embedding"], np.float32)
    assert np.array_equal(back, vector)
    classified = ResultRecord.model_validate(
        {"job_id": "j", "image": "b.jpg", "model": "m", "top5": [], "error": None}
    )
    assert "embedding" not in classified.to_json_dict() and not classified.is_embedding


def test_records_a_worker_builds_match_the_contract(tmp_path: Path) -> None:
    from shared.settings import Settings
    from tests.savedmodels import build_classifier
    from workers.runtime import Runtime

    build_classifier(tmp_path / "tiny", len(LABELS), output="dict")
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    (tmp_path / "models.toml").write_text(
        '[models.tiny]\nhandle = "tiny"\ninput_size = 32\nlabels = "labels.txt"\n',
        encoding="utf-8",
    )
    good = tmp_path / "good.png"
    Image.fromarray(np.full((40, 30, 3), 120, np.uint8)).save(good)
    (tmp_path / "empty.jpg").write_bytes(b"")
    images = [
        ImageRef(src=name, ref=str(tmp_path / name)) for name in ("good.png", "empty.jpg", "no.jpg")
    ]
    runtime = Runtime.start(
        ["tiny"], Settings(models_file=tmp_path / "models.toml", decode_threads=1)
    )
    try:
        records = runtime.classify("job-1", "tiny", images)
        unknown = runtime.classify("job-1", "other", images[:1])
    finally:
        runtime.close()
    ok, empty, missing = records
    assert ok["error"] is None and len(ok["top5"]) == 5
    assert {p["label"] for p in ok["top5"]} <= set(LABELS)
    assert empty["error"] == {"code": "empty_file", "message": empty["error"]["message"]}
    assert missing["error"] is not None and missing["error"]["code"] == "not_found"
    assert unknown[0]["error"] is not None and unknown[0]["error"]["code"] == "unknown_model"
    crashed = error_result("job-1", "x.jpg", "tiny", ErrorCode.WORKER_CRASHED, "died")
    for record in [*records, *unknown, crashed]:
        assert_matches_contract(record)


def test_a_worker_fails_a_malformed_message_at_once(shared_worker: Any, client: Any) -> None:
    from shared.celery_app import CLASSIFY_TASK
    from shared.registry import queue_for

    tid = task_id("contract-bad", "t1001", 0)
    result = client.app.send_task(
        CLASSIFY_TASK,
        args=["contract-bad", "t1001", 0, [["only-src"]]],
        task_id=tid,
        queue=queue_for("t1001"),
    )
    error = result.get(timeout=60, propagate=False)
    assert result.state == "FAILURE"
    assert "malformed image list" in str(error)
    assert "InvalidTask" in (result.traceback or "")
    # Recorded as finished, under the task's own id, after the result is stored.
    deadline = time.monotonic() + 30
    while not client.store.finished_tasks("contract-bad") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.store.finished_tasks("contract-bad") == {tid: (0, 1)}  # its one image failed
    # Not retried: the worker logged no retry of it.
    assert f"Task {CLASSIFY_TASK}[{tid}] retry" not in shared_worker.output()
