"""One typed settings object, read from the environment (prefix ``IMGQ_``)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.modes import DecodeMode, Precision, RuntimeKind

DEFAULT_BROKER_URL = "redis://localhost:6379/0"
# Bounds a models file's per-model overrides (shared.registry) share with these settings.
BATCH_SIZE_BOUNDS = (1, 4096)
MAX_BATCH_DELAY_MS_BOUNDS = (0, 10_000)


# What imgq can talk to for the queues, the results and the job records.
REDIS_SCHEMES = ("redis", "rediss", "sentinel", "redis+socket", "unix")


class SettingsError(ValueError):
    """A setting has a value imgq cannot use; the message is one line that names the
    environment variable, its value and what is allowed."""


def env_names(field: str) -> list[str]:
    """The environment variables a setting is read from (``IMGQ_<FIELD>``, or its aliases)."""
    alias = Settings.model_fields[field].validation_alias
    choices = getattr(alias, "choices", None)
    return [str(c) for c in choices] if choices else [f"IMGQ_{field.upper()}"]


def env_name(field: str) -> str:
    """The variable a setting was read from: the one set, else the first name."""
    names = env_names(field)
    return next((n for n in names if n in os.environ), names[0])


def _redact(url: str) -> str:
    """A URL without its password, for messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:
        return "<unparsable URL>"
    return parts._replace(netloc=f"{parts.username or ''}:***@{parts.hostname}").geturl()


def check_redis_url(url: str) -> str:
    """The URL, or a ValueError when it is no Redis URL imgq can use: a scheme of
    ``REDIS_SCHEMES`` (each part of a ``;``-separated Sentinel list), and a database
    index, when given, that is a number."""
    for part in url.split(";"):
        part = part.strip()
        scheme = part.split("://", 1)[0].lower() if "://" in part else ""
        if scheme not in REDIS_SCHEMES:
            raise ValueError(
                f"must be a URL starting with {', '.join(s + '://' for s in REDIS_SCHEMES[:3])}"
                " (for example redis://localhost:6379/0)"
            )
        if scheme in ("redis", "rediss", "sentinel"):
            path = urlsplit(part).path.strip("/")
            if path and not (path.isdigit() and int(path) < 1_000_000):
                raise ValueError(f"the database index must be a number, not {path!r}")
    return url


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
    result_cache: bool = Field(
        True,
        description=(
            "With the PostgreSQL results store: reuse a model's output for an image it "
            "already computed (same image bytes, model files and settings) instead of "
            "running the model again."
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
    redis_connect_timeout: float = Field(
        5.0,
        gt=0,
        le=300,
        description=(
            "Seconds to open a connection to Redis (or a Sentinel) before trying again: "
            "after a failover, a dead master's address fails in this time instead of the "
            "operating system's minutes."
        ),
    )
    heartbeat_interval: float = Field(
        2.0, gt=0, le=60, description="Seconds between a worker's heartbeats."
    )
    heartbeat_timeout: float = Field(
        10.0,
        ge=1,
        le=3600,
        description=(
            "Seconds without a heartbeat after which a worker counts as dead and the "
            "tasks it held go back on their queues; also how long a completion callback's "
            "sender holds it without renewing."
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
        description=(
            "Default runtime of a worker's models: tensorflow, openvino (CPU) or numpy "
            "(a linear model file, no TensorFlow: smoke tests)."
        ),
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
    s3_endpoint_url: str | None = Field(
        None,
        description=(
            "S3-compatible endpoint for s3:// sources and outputs (MinIO, Ceph ...); "
            "unset: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, else AWS itself."
        ),
    )
    s3_max_attempts: int = Field(
        5,
        ge=1,
        le=20,
        description="Tries per S3 request; throttling (503 SlowDown) retried with backoff.",
    )
    notify_secret: str = Field(
        "", description="Key signing completion callbacks (HMAC-SHA256; empty: unsigned)."
    )
    notify_tries: int = Field(
        6, ge=1, le=20, description="Tries per completion callback, all processes together."
    )
    notify_backoff: float = Field(
        1.0, gt=0, description="Seconds before a callback's second try; doubled after each."
    )
    memory_growth: bool = Field(True, description="Allocate GPU memory as needed, not all at once.")
    gpu_memory_limit_mb: int = Field(
        0,
        ge=0,
        description=(
            "Most GPU memory this worker's TensorFlow may take, in MiB (0: no cap); for "
            "several workers on one GPU."
        ),
    )
    require_gpu: bool | None = Field(
        None,
        description=(
            "Refuse to start without a GPU (unset: when imgq worker --gpu or "
            "NVIDIA_VISIBLE_DEVICES asked for one; false: never)."
        ),
    )
    warm_up: bool = Field(
        True, description="Trace every fixed batch size of each model before consuming."
    )
    ready_file: Path | None = Field(
        None,
        description=(
            "A file the worker creates once its models are loaded and warm, and removes "
            "when it stops (a startup probe: test -f FILE)."
        ),
    )
    warm_up_sizes: Literal["all", "largest"] = Field(
        "all",
        description=(
            "Which fixed batch sizes the warm-up traces: all, or the largest only (bulk "
            "work: the others are traced when a partial batch first needs them)."
        ),
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

    @field_validator("broker_url")
    @classmethod
    def _broker_is_redis(cls, value: str) -> str:
        return check_redis_url(value)

    @field_validator("result_backend")
    @classmethod
    def _backend_is_redis(cls, value: str | None) -> str | None:
        return None if value is None else check_redis_url(value)

    @field_validator("results_url")
    @classmethod
    def _results_store_known(cls, value: str) -> str:
        scheme = value.split("://", 1)[0].lower() if "://" in value else value.strip().lower()
        if scheme not in ("", "redis", "postgresql", "postgres"):
            raise ValueError("must be 'redis' or a postgresql:// URL")
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _s3_endpoint_is_http(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            return None
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("must be an http or https URL (for example http://minio:9000)")
        return value

    @field_validator("models_file")
    @classmethod
    def _models_file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.expanduser().is_file():
            raise ValueError("no such file (a TOML file of [models.NAME] tables)")
        return value

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


def describe_error(exc: ValidationError) -> str:
    """One line for a settings validation error: the variable as the user wrote it,
    its value, and what is allowed (the first error; pydantic's links left out)."""
    error = exc.errors()[0]
    message = str(error["msg"]).removeprefix("Value error, ")
    if message[1:2].islower():  # "Input should ..." but not "IMGQ_..."
        message = message[:1].lower() + message[1:]
    if not error["loc"]:  # a check across settings names its variables itself
        return f"invalid settings: {message}"
    field = str(error["loc"][0])
    name = env_name(field) if field in Settings.model_fields else field
    value = os.environ.get(name, error.get("input"))
    secret_urls = ("broker_url", "result_backend", "results_url", "s3_endpoint_url")
    if field in secret_urls and isinstance(value, str):
        value = _redact(value)
    return f"{name}={value!r} is refused: {message}"


def load_settings() -> Settings:
    """Settings read from the environment now; a SettingsError (one line) when a
    value cannot be used."""
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError(describe_error(exc)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use; a
    SettingsError (one line) when a value cannot be used."""
    return load_settings()
