# One image for every imgq service: Redis-backed workers (`imgq worker`), the
# producer (`imgq submit`) and Flower (`celery -A workers.app flower`). There is
# no ENTRYPOINT: a service is chosen only by its command, so the same image runs
# both `imgq ...` and `celery ...` (see docker-compose.yml).
#
# Build (CPU-only TensorFlow, the default):
#   docker build -t imgq .
# Build for NVIDIA GPU hosts (TensorFlow with its CUDA libraries from pip; the
# host needs only the NVIDIA driver and the NVIDIA Container Toolkit):
#   docker build --build-arg TF_PACKAGE='tensorflow[and-cuda]' -t imgq:gpu .
# Another base image (a mirror of python:3.11-slim, or a local one on hosts that
# reach no image registry; it needs Python 3.11+ as `python`, pip as `pip`, and
# groupadd/useradd), for either build:
#   docker build --build-arg BASE_IMAGE=registry.example.com/python:3.11-slim -t imgq .

ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# Which TensorFlow distribution replaces `tensorflow-cpu` from the project's
# `worker` extra: `tensorflow-cpu` (default) or `tensorflow[and-cuda]` for GPUs.
# The version bounds stay the ones pyproject.toml gives.
ARG TF_PACKAGE=tensorflow-cpu

# TFHUB_CACHE_DIR: downloaded TF Hub models live here; compose and Kubernetes
# mount a volume on it, so a model is downloaded once, not at every start.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TFHUB_CACHE_DIR=/cache/tfhub \
    CUDA_CACHE_PATH=/cache/cuda \
    CUDA_CACHE_MAXSIZE=4294967296 \
    TF_CPP_MIN_LOG_LEVEL=1

# A fixed, unprivileged user. The directories that volumes are mounted on are
# created here and owned by it, so a fresh named volume starts out writable.
RUN groupadd --system --gid 10001 imgq \
 && useradd --system --uid 10001 --gid imgq --create-home --home-dir /home/imgq imgq \
 && mkdir -p /app /cache/tfhub /cache/cuda /data /images /results \
 && chown imgq:imgq /cache/tfhub /cache/cuda /data /images /results

WORKDIR /app

# Dependencies first, in their own layer, so that editing the source does not
# reinstall TensorFlow. They are read from pyproject.toml (the project's
# dependencies plus its `worker` extra, with TF_PACKAGE in place of
# tensorflow-cpu, and the extras named in IMAGE_EXTRAS: `report` so that
# `imgq report` works in the image, `postgres` for the
# PostgreSQL results store, `s3` for s3:// sources and outputs), so the bounds are written in one place only.
ARG IMAGE_EXTRAS="report postgres s3"
COPY pyproject.toml ./
RUN python -c "import os, sys, tomllib; \
p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
tf, w = os.environ['TF_PACKAGE'], p['optional-dependencies']['worker']; \
any(r.startswith('tensorflow-cpu') for r in w) or sys.exit('no tensorflow-cpu in the worker extra'); \
print('\\n'.join(p['dependencies'] + [tf + r[len('tensorflow-cpu'):] \
    if r.startswith('tensorflow-cpu') else r for r in w] \
    + [r for e in os.environ['IMAGE_EXTRAS'].split() for r in p['optional-dependencies'][e]]))" \
    > /tmp/requirements.txt
RUN cat /tmp/requirements.txt && pip install -r /tmp/requirements.txt

# The project itself (no dependencies left to resolve).
COPY . .
RUN pip install --no-deps . \
 && imgq --version

USER imgq:imgq

# No ENTRYPOINT: every service names its command. Without one, show the help.
CMD ["imgq", "--help"]
