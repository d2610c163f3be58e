# ForgeSyte plugin host: `forgesyte` and a Python for Python plugins.
#
#   deploy/build-image.sh            (podman or docker; or:)
#   docker build -t forgesyte:0.1.0 .
#   docker run --rm -p 8000:8000 -v "$PWD/plugins:/plugins:ro" forgesyte:0.1.0
#
# Plugins come from a volume at /plugins, or from a layer of your own image:
#   FROM forgesyte:0.1.0
#   COPY plugins/ /plugins/
# (build native plugins with the same Rust image as the builder below, so
# their build fingerprint matches the host's target).

# ---- builder: the release binary -------------------------------------------
# The toolchain the project is built and tested with (bookworm: the same
# glibc as the runtime stage).
ARG RUST_VERSION=1.95
# The runtime base: Debian slim; for GPU nodes a CUDA runtime image of the
# same or a newer glibc, e.g.
#   deploy/build-image.sh forgesyte-gpu:0.1.0 --build-arg RUNTIME_BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG RUNTIME_BASE=debian:bookworm-slim
FROM rust:${RUST_VERSION}-slim-bookworm AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p forgesyte-server --bin forgesyte \
 && install -D -m 0755 target/release/forgesyte /out/forgesyte

# ---- runtime: the binary, python3, tini, nothing else ----------------------------
FROM ${RUNTIME_BASE} AS runtime
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 forgesyte \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin forgesyte \
 && mkdir -p /plugins /etc/forgesyte
COPY --from=builder /out/forgesyte /usr/local/bin/forgesyte
# The defaults (listen on 0.0.0.0:8000, plugins from /plugins, JSON logs)
# are a config file, not flags or variables baked in: `docker run -e
# FORGESYTE_LOG_FORMAT=text`, a flag, or a file of your own (`serve
# --config FILE`) can change any of them. Outside /etc/forgesyte, which a
# volume of your own (trusted keys, a config) may hide.
COPY deploy/forgesyte.toml /usr/local/share/forgesyte/forgesyte.toml
COPY deploy/healthcheck.py /usr/local/share/forgesyte/healthcheck.py
# The server's cache of the Python runner goes under /tmp (a private 0700
# directory: where /tmp lets anyone write there without the sticky bit, as
# a Kubernetes emptyDir does, the runner is served from its sources
# instead), and bytecode that unconfined runners write (`--confine off`)
# too, never into the plugin tree, which may be read-only. Confined runners
# start with the plan's environment only, and write no bytecode at all.
ENV XDG_CACHE_HOME=/tmp/cache \
    PYTHONPYCACHEPREFIX=/tmp/pycache \
    FORGESYTE_CONFIG=/usr/local/share/forgesyte/forgesyte.toml
USER 10001:10001
EXPOSE 8000
# python3 is in the image anyway: it asks /livez (liveness only; readiness
# is the orchestrator's /readyz) of the address `forgesyte config --print`
# reports, so FORGESYTE_BIND or a config file of your own moves it too
# (a --bind flag on the command line does not: see the script).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python3", "/usr/local/share/forgesyte/healthcheck.py"]
# tini is the container's first process, not the server: the processes of a
# plugin's runner that ended (its group killed) are handed to the first
# process, which must reap them; the server reaps only its own children, so
# as PID 1 it gathered zombies. tini passes signals on to the server and
# ends with it.
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/forgesyte"]
CMD ["serve"]
