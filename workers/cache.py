"""The worker's side of the result cache (``shared.result_cache``): a chunk's images
read and hashed, looked up at once, the hits turned into records without a decode or
a model call, the computed ones stored for next time.

A cache failure (PostgreSQL away) never fails a task: the chunk is computed as if
nothing were cached, and the failure logged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shared.contract import ResultDict, embedding_result
from shared.result_cache import CachedResult, ResultCache, image_digest, model_identity
from workers import metrics
from workers.classifier import Classifier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lookup:
    """A chunk's images against the cache: each image's digest (None: unreadable),
    and the entries found, by image index."""

    digests: list[bytes | None]
    hits: dict[int, CachedResult]


class WorkerCache:
    """The cache as one worker uses it: a model identity per loaded model."""

    def __init__(self, cache: ResultCache, identities: Mapping[str, str]) -> None:
        self.cache = cache
        self.identities = dict(identities)

    @classmethod
    def for_models(
        cls, url: str, classifiers: Mapping[str, Classifier], decode: Mapping[str, str]
    ) -> WorkerCache:
        """The cache at ``url``, with the identity of each loaded model (its files are
        hashed once here); ``decode`` is each model's decode mode."""
        identities = {}
        for name, clf in classifiers.items():
            assert clf.backend is not None, "load() the classifier first"
            identities[name] = model_identity(
                clf.spec,
                precision=clf.backend.precision.value,
                runtime=clf.backend.name,
                decode=decode[name],
                top_k=clf.top_k,
                labels=clf.labels,
            )
        cache = ResultCache(url)
        cache.check()
        return cls(cache, identities)

    def lookup(self, model: str, data: Sequence[bytes | None]) -> Lookup:
        """Digest each image's bytes (None: it could not be read) and fetch the entries."""
        digests = [None if d is None else image_digest(d) for d in data]
        identity = self.identities.get(model)
        hits: dict[int, CachedResult] = {}
        wanted = [d for d in digests if d is not None]
        if identity is not None and wanted:
            try:
                found = self.cache.get_many(identity, wanted)
            except Exception as exc:
                log.warning("result cache unavailable (%s): computing every image", exc)
                found = {}
            hits = {i: found[d] for i, d in enumerate(digests) if d is not None and d in found}
        counters = metrics.for_model(model)
        if counters is not None:
            counters.cache_hits.inc(len(hits))
            counters.cache_misses.inc(len(wanted) - len(hits))
        return Lookup(digests, hits)

    def store(
        self, model: str, lookup: Lookup, records: Sequence[ResultDict], computed: Sequence[int]
    ) -> None:
        """Keep the successful records of the images ``computed`` (indices in the chunk)."""
        identity = self.identities.get(model)
        if identity is None:
            return
        entries: dict[bytes, CachedResult] = {}
        for i in computed:
            digest = lookup.digests[i]
            entry = entry_of(records[i])
            if digest is not None and entry is not None:
                entries[digest] = entry
        try:
            self.cache.put_many(identity, model, entries)
        except Exception as exc:
            log.warning("result cache unavailable (%s): %d results not kept", exc, len(entries))

    def close(self) -> None:
        """Close the cache's connection of this thread."""
        self.cache.close()


def entry_of(record: ResultDict) -> CachedResult | None:
    """What the cache keeps of a record: its top-5 or its vector; None for a failure."""
    if record.get("error") is not None:
        return None
    if "embedding" in record:
        import numpy as np

        return CachedResult(embedding=np.asarray(record["embedding"], np.float32))
    return CachedResult(top5=[dict(p) for p in record.get("top5", [])])


def record_of(job_id: str, image: str, model: str, entry: CachedResult) -> ResultDict:
    """The record of a cached image: the same as a fresh computation's."""
    if entry.embedding is not None:
        return embedding_result(job_id, image, model, entry.embedding)
    return {
        "job_id": job_id,
        "image": image,
        "model": model,
        "top5": [
            {"index": int(p["index"]), "label": str(p["label"]), "score": float(p["score"])}
            for p in entry.top5 or []
        ],
        "error": None,
    }
