# Stand-ins for the third-party images of docker-compose.yml (redis:7,
# postgres:15, prom/prometheus), built from a local Debian base with Debian's
# own servers, for hosts that reach an apt mirror but no image registry (the
# deployment test). They run the same servers on the same ports with the same
# data folders, so the compose file's commands, healthchecks and volumes apply
# unchanged:
#
#   docker build --network host -f deploy/test/standins.Dockerfile \
#     --target redis -t imgq-standin-redis deploy/test
#
# and the same with `--target postgres` and `--target prometheus`. Grafana has
# no Debian package and no stand-in.
#
# BASE_IMAGE: deploy/test/debian-base.sh builds one (Debian bookworm).
ARG BASE_IMAGE=imgq-debian-base:bookworm

# redis:7's layout: redis-server and redis-cli on PATH, data in /data, the
# server running as the redis user.
FROM ${BASE_IMAGE} AS redis
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server", "--protected-mode", "no"]

# postgres:15's interface: POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB
# create the user and database on the first start, the data lives in
# /var/lib/postgresql/data, pg_isready is on PATH, port 5432 on every address
# with password authentication.
FROM ${BASE_IMAGE} AS postgres
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
 && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
USER postgres
EXPOSE 5432
STOPSIGNAL SIGINT
CMD ["postgres-entrypoint.sh"]

# prom/prometheus's interface: the configuration in
# /etc/prometheus/prometheus.yml, the data in /prometheus, port 9090.
FROM ${BASE_IMAGE} AS prometheus
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /prometheus && chown nobody:nogroup /prometheus
WORKDIR /prometheus
USER nobody
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
