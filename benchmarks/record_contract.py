"""How fast a worker can build result records: the contract's TypedDict against the
pydantic model, and how the producer reads them back.

    python benchmarks/record_contract.py

Prints microseconds per record (best of five rounds) for one classified image with
five predictions, built three ways, and the parse the producer does for each record.
No Redis, no TensorFlow.
"""

from __future__ import annotations

import json
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.contract import ResultDict, ok_result
from shared.schemas import Prediction, ResultRecord

LABELS = [f"class {i}" for i in range(1001)]
INDICES = (7, 42, 99, 500, 1000)
SCORES = (0.41, 0.22, 0.11, 0.05, 0.01)
N = 20_000


def typed_dict() -> ResultDict:
    """The contract's way: a plain dict, typed statically."""
    return ok_result("job", "photos/a.jpg", "resnet50", INDICES, SCORES, LABELS)


def pydantic_model() -> dict[str, object]:
    """The pydantic model built from its parts, then dumped to JSON types."""
    top5 = [
        Prediction(index=k, label=LABELS[k], score=s) for k, s in zip(INDICES, SCORES, strict=True)
    ]
    return ResultRecord(
        job_id="job", image="photos/a.jpg", model="resnet50", top5=top5
    ).to_json_dict()


def pydantic_validated() -> dict[str, object]:
    """The dict checked by the pydantic model on the way out."""
    return ResultRecord.model_validate(typed_dict()).to_json_dict()


def best_us(fn: object) -> float:
    """Best of five rounds of N calls, in microseconds per call."""
    return min(timeit.repeat(fn, number=N, repeat=5)) / N * 1e6  # type: ignore[arg-type]


def main() -> None:
    """Measure and print the figures."""
    assert (
        json.dumps(typed_dict()) == json.dumps(pydantic_model()) == json.dumps(pydantic_validated())
    ), "the three ways must give the same JSON"
    wire = json.dumps(typed_dict())
    figures = {
        "TypedDict (contract.ok_result)": best_us(typed_dict),
        "pydantic ResultRecord(...).to_json_dict()": best_us(pydantic_model),
        "pydantic model_validate(dict).to_json_dict()": best_us(pydantic_validated),
        "producer parse: ResultRecord.model_validate_json": best_us(
            lambda: ResultRecord.model_validate_json(wire)
        ),
    }
    for name, us in figures.items():
        print(f"{name:<50} {us:6.2f} us/record")
    ratio = (
        figures["pydantic ResultRecord(...).to_json_dict()"]
        / figures["TypedDict (contract.ok_result)"]
    )
    print(f"pydantic build / TypedDict build: {ratio:.1f}x")


if __name__ == "__main__":
    main()
