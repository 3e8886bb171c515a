# syntax=docker/dockerfile:1
# One image for every bgfn process; the command picks it: `serve` (default), `worker`, `check`...
# Build:  docker build -t bgfn .
# Run:    docker run -e REDIS_URL=redis://redis:6379/0 -p 8888:8888 bgfn            # web
#         docker run -e REDIS_URL=redis://redis:6379/0 bgfn worker                  # worker
# The example functions are baked in at /site; mount your own site over it:
#         docker run -v "$PWD:/site:ro" ... bgfn serve

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY bgfn ./bgfn
RUN pip wheel --no-cache-dir --wheel-dir /wheels -c constraints.txt .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BGFN_SITE=/site \
    BGFN_BIND=0.0.0.0:8888
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl && rm -rf /wheels \
    && useradd --create-home --uid 10001 bgfn
WORKDIR /site
COPY --chown=bgfn netlify.toml ./
COPY --chown=bgfn functions ./functions
USER bgfn
EXPOSE 8888
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8888/.bgfn/health', timeout=2)"]
# Exec form: SIGTERM reaches bgfn directly (gunicorn and RQ shut down gracefully).
ENTRYPOINT ["bgfn"]
CMD ["serve"]
