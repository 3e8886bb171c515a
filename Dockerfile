# syntax=docker/dockerfile:1
# One image for every bgfn process; the command picks it:
#   docker run ... bgfn                  # `bgfn serve`: the web tier (the default command)
#   docker run ... bgfn worker           # RQ workers for background functions
#   docker run ... bgfn scheduler        # scheduled functions
#   docker run ... bgfn check            # any other bgfn command
# Build:  docker build -t bgfn .
# Run:    docker run -e REDIS_URL=redis://redis:6379/0 -p 8888:8888 bgfn
#         docker run -e REDIS_URL=redis://redis:6379/0 --stop-timeout 960 \
#                -e BGFN_SHUTDOWN_GRACE=900 bgfn worker
# The example site (netlify.toml + functions/) is baked in at /site. Your own site: mount it over
# it (docker run -v "$PWD:/site:ro" ...) or bake it into an image of your own:
#   FROM bgfn
#   COPY netlify.toml bgfn.toml* /site/
#   COPY functions /site/functions
# docker-compose.yml runs Redis, web, workers and the scheduler; docs/scale-out.md runs them on
# several hosts and on Kubernetes. tests/test_deploy.py runs this file's commands outside Docker.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtualenv with bgfn and its pinned dependencies ---------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV VIRTUAL_ENV=/opt/venv \
    PATH="/opt/venv/bin:$PATH" \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY bgfn ./bgfn
RUN python3 -m venv "$VIRTUAL_ENV"
# Every dependency is pinned in constraints.txt (the lock of this image).
RUN pip install --no-cache-dir -c constraints.txt .

# --- runtime: the virtualenv, the example site, a non-root user; no compiler, no pip cache -------
FROM ${PYTHON_IMAGE} AS runtime
ENV VIRTUAL_ENV=/opt/venv \
    PATH="/opt/venv/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BGFN_SITE=/site \
    BGFN_BIND=0.0.0.0:8888
# 0.0.0.0 only inside the container: the port is reachable only where it is published (-p, ports:).
RUN groupadd --system --gid 10001 bgfn \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/bgfn --create-home bgfn
COPY --from=build /opt/venv /opt/venv
COPY deploy/healthcheck.py /opt/bgfn/healthcheck.py
WORKDIR /site
# The site belongs to root and is read-only to bgfn; only the example's output folder is writable.
COPY netlify.toml ./
COPY functions ./functions
RUN mkdir -p /site/.bgfn/example-output && chown bgfn:bgfn /site/.bgfn/example-output
USER 10001:10001
EXPOSE 8888
# Healthy: `serve` answers /.bgfn/health; `worker`/`scheduler` running with Redis answering PING.
# (Kubernetes ignores HEALTHCHECK: deploy/kubernetes/ has probes of its own.)
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/opt/bgfn/healthcheck.py"]
# Exec form: bgfn is PID 1 and gets SIGTERM itself (gunicorn finishes requests in flight, a worker
# its job); give `docker stop` time for it (--stop-timeout / stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["bgfn"]
CMD ["serve"]
