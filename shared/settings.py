"""One typed settings object, read from the environment (prefix ``IMGQ_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.modes import DecodeMode, Precision, RuntimeKind

DEFAULT_BROKER_URL = "redis://localhost:6379/0"
# Bounds a models file's per-model overrides (shared.registry) share with these settings.
BATCH_SIZE_BOUNDS = (1, 4096)
MAX_BATCH_DELAY_MS_BOUNDS = (0, 10_000)


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Everything imgq reads from the environment. Built once by :func:`get_settings`."""

    model_config = SettingsConfigDict(env_prefix="IMGQ_", extra="ignore")

    # --- where things live -------------------------------------------------
    broker_url: str = Field(DEFAULT_BROKER_URL, description="Celery broker (Redis) URL.")
    result_backend: str | None = Field(
        None, description="Celery result backend URL; defaults to the broker URL."
    )
    results_url: str = Field(
        "redis",
        description=(
            "Where result records live: 'redis' (Celery results, expiring) or a "
            "postgresql:// URL (a table, kept until `imgq delete`)."
        ),
    )
    models_file: Path | None = Field(
        None, description="TOML file that adds or overrides models in the registry."
    )

    # --- lifetimes ---------------------------------------------------------
    result_expires: int = Field(
        7 * 24 * 3600, ge=60, description="Seconds results and job records are kept."
    )
    visibility_timeout: int = Field(
        3600,
        ge=10,
        description=(
            "Seconds before Redis redelivers a task that a worker took but did not "
            "acknowledge (the worker died). Must exceed the longest task."
        ),
    )

    sentinel_master: str = Field(
        "mymaster",
        min_length=1,
        description=(
            "Name of the Redis master the Sentinels watch, for sentinel:// broker and "
            "result backend URLs."
        ),
    )

    # --- liveness and recovery -----------------------------------------------
    heartbeat_interval: float = Field(
        2.0, gt=0, le=60, description="Seconds between a worker's heartbeats."
    )
    heartbeat_timeout: float = Field(
        10.0,
        ge=1,
        le=3600,
        description=(
            "Seconds without a heartbeat after which a worker counts as dead and the "
            "tasks it held go back on their queues."
        ),
    )
    sweep_grace: float = Field(
        60.0,
        ge=1,
        description=(
            "Seconds a job may go without progress before workers look for tasks of it "
            "that are in no queue, held by no live worker and without a result, and send "
            "them again."
        ),
    )

    # --- producer ------------------------------------------------------------
    chunk_size: int = Field(32, ge=1, le=4096, description="Image references per task.")

    # --- worker --------------------------------------------------------------
    worker_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Models a worker started with `celery -A workers.app worker` serves.",
    )
    batch_size: int = Field(
        32,
        ge=BATCH_SIZE_BOUNDS[0],
        le=BATCH_SIZE_BOUNDS[1],
        description="Largest batch per model call.",
    )
    max_batch_delay_ms: float = Field(
        2.0,
        ge=MAX_BATCH_DELAY_MS_BOUNDS[0],
        le=MAX_BATCH_DELAY_MS_BOUNDS[1],
        description="Milliseconds a batch waits for more images after its first one.",
    )
    worker_concurrency: int = Field(
        4,
        ge=1,
        le=1024,
        description=(
            "Tasks a worker runs at once (threads). Raise it to at least twice the batch "
            "size for single-image tasks, so batches can fill."
        ),
    )
    jit_compile: bool = Field(False, description="Compile the model call with XLA.")
    mixed_precision: bool = Field(
        False, description="Older name for IMGQ_PRECISION=fp16 (when IMGQ_PRECISION is unset)."
    )
    precision: Precision = Field(
        Precision.FP32,
        description=(
            "Default precision of a worker's models: fp32, bf16 (CPUs with AMX or "
            "AVX512-BF16), fp16 (GPUs) or auto (the fastest the device runs natively)."
        ),
    )
    runtime: RuntimeKind = Field(
        RuntimeKind.TENSORFLOW,
        description="Default runtime of a worker's models: tensorflow or openvino (CPU).",
    )
    decode: DecodeMode = Field(
        DecodeMode.FAST,
        description="JPEG decoding: fast (DCT downscaling) or exact (full decode, then resize).",
    )
    openvino_cache_dir: Path = Field(
        Path("~/.cache/imgq/openvino"),
        description="Where models converted for OpenVINO are kept, so a restart reuses them.",
    )
    decode_threads: int = Field(4, ge=1, le=256, description="Threads decoding images.")
    allowed_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Local files are read only under these directories (empty: anywhere).",
    )
    max_image_bytes: int = Field(
        50 * 1024 * 1024, ge=1, description="Largest image file or download, in bytes."
    )
    max_image_pixels: int = Field(
        89_478_485,
        ge=1,
        description="Largest decoded image (width x height); beyond it, a decompression bomb.",
    )
    fetch_timeout: float = Field(10.0, gt=0, description="Seconds to fetch one URL.")
    fetch_max_redirects: int = Field(5, ge=0, description="Redirects followed per URL.")
    allow_private_urls: bool = Field(
        False,
        description="Fetch URLs on loopback, private and link-local addresses (trusted networks).",
    )
    notify_secret: str = Field(
        "", description="Key signing completion callbacks (HMAC-SHA256; empty: unsigned)."
    )
    notify_tries: int = Field(6, ge=1, le=20, description="Tries per completion callback.")
    notify_backoff: float = Field(
        1.0, gt=0, description="Seconds before a callback's second try; doubled after each."
    )
    memory_growth: bool = Field(True, description="Allocate GPU memory as needed, not all at once.")
    warm_up: bool = Field(
        True, description="Trace every fixed batch size of each model before consuming."
    )
    worker_metrics_port: int = Field(
        0, ge=0, le=65535, description="Port of a worker's Prometheus /metrics (0: off)."
    )
    worker_metrics_addr: str = Field(
        "127.0.0.1", description="Address a worker's /metrics listens on (0.0.0.0: all)."
    )
    tfhub_cache_dir: Path = Field(
        Path("~/.cache/imgq/tfhub"),
        validation_alias=AliasChoices("TFHUB_CACHE_DIR", "IMGQ_TFHUB_CACHE_DIR"),
        description=(
            "Where models downloaded from TF Hub or Kaggle are kept (TF Hub's own "
            "TFHUB_CACHE_DIR): downloaded once, reused by every worker that shares it."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _split_lists(cls, data: object) -> object:
        if isinstance(data, dict):
            for key in ("worker_models", "allowed_roots"):
                if key in data:
                    data[key] = _split_csv(data[key])
        return data

    @model_validator(mode="after")
    def _mixed_precision_is_fp16(self) -> Settings:
        # IMGQ_MIXED_PRECISION=true predates IMGQ_PRECISION; an explicit precision wins.
        if self.mixed_precision and "precision" not in self.model_fields_set:
            self.precision = Precision.FP16
        return self

    @model_validator(mode="after")
    def _heartbeat_fits(self) -> Settings:
        if self.heartbeat_timeout < 2 * self.heartbeat_interval:
            raise ValueError(
                f"IMGQ_HEARTBEAT_TIMEOUT ({self.heartbeat_timeout:g}) must be at least twice "
                f"IMGQ_HEARTBEAT_INTERVAL ({self.heartbeat_interval:g}), or a live worker "
                "that misses one beat counts as dead"
            )
        return self

    @property
    def backend_url(self) -> str:
        """The result backend URL actually used."""
        return self.result_backend or self.broker_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings()
