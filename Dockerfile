# latentserve images. Two targets:
#
#   runtime (the default, last stage): the HTTP service only. ONNX Runtime, FastAPI, uvicorn; no torch,
#            no ONNX exporter. Runs as uid 10001, serves /models, health-checked on GET /ready.
#   trainer: torch (CPU build by default) + the `train` extra; `python -m training build-defaults`
#            fits and exports the default models into /models when they are missing.
#
#   docker build -t latentserve:latest .
#   docker build --target trainer -t latentserve-trainer:latest .
#
# Build arguments:
#   BASE_IMAGE       any image with Python 3.11 and its venv module at python3 on PATH
#                    (python:3.11-slim by default; Debian bookworm with python3-venv works too).
#   TORCH_INDEX_URL  extra index for torch in the trainer: the CPU wheels by default. Empty: PyPI's
#                    default build (CUDA, several GB; what the compose file's GPU trainer uses).
#                    torch==2.13.0 is pinned exactly; a wheel placed in .whl/ of the build context
#                    is preferred (offline or air-gapped builds).
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST, PIP_CERT and the usual *_PROXY variables
#                    are passed on to pip when given (mirrors, proxies).
#
# The file sticks to what the classic builder understands (no RUN --mount, no heredocs), so it
# builds with BuildKit and without it.

ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Both images run as this user (uid 10001), and /models is theirs.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home --shell /usr/sbin/nologin app \
    && mkdir -p /models \
    && chown app:app /models
WORKDIR /app

# ---------------------------------------------------------------------------------------------------
# The service's dependencies, installed from pyproject.toml alone (a cached layer while only the
# source changes), then the package itself without dependencies.
FROM base AS service-build
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_CERT
# A venv rather than the system site-packages: works the same on python:3.11-slim and on a Debian
# python3 whose system Python is "externally managed" (PEP 668).
COPY pyproject.toml /app/
RUN python3 -m venv /opt/venv \
    && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-compile -r /tmp/requirements.txt
COPY README.md /app/
# The service and the repository contract it reads; not training/ (torch), which this image cannot run.
COPY model_repository/ /app/model_repository/
COPY service/ /app/service/
# The runtime needs neither pip nor setuptools, nor numpy's test suite.
RUN pip install --no-compile --no-deps . \
    && rm -rf /app/build /app/*.egg-info \
    && python -m pip uninstall --yes --quiet pip setuptools \
    && find /opt/venv -depth -type d \( -name tests -o -name __pycache__ \) -path '*/site-packages/*' -exec rm -rf {} +

# ---------------------------------------------------------------------------------------------------
FROM base AS trainer
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG PIP_CERT
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# `.whl*` matches the git-ignored .whl/ folder when it exists; pyproject.toml makes the COPY valid
# when it does not (pip's --find-links ignores files that are not wheels).
COPY pyproject.toml .whl* /wheels/
RUN python3 -m venv /opt/venv \
    && PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL $PIP_EXTRA_INDEX_URL" pip install --no-compile --find-links /wheels torch==2.13.0 \
    && rm -rf /wheels
# The service's and the `train` extra's dependencies from pyproject.toml (torch is already there and
# satisfies its pin), then the package itself.
COPY pyproject.toml /app/
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['train']))" \
        > /tmp/requirements.txt \
    && pip install --no-compile -r /tmp/requirements.txt
COPY README.md /app/
COPY model_repository/ /app/model_repository/
COPY training/ /app/training/
COPY service/ /app/service/
RUN pip install --no-compile --no-deps . \
    && rm -rf /app/build /app/*.egg-info
# Models already in the build context's models/ are baked in: a fresh named volume starts as a copy
# of them, and build-defaults skips every model that is there and valid.
COPY --chown=app:app models/ /models/
ENV MPLCONFIGDIR=/tmp/matplotlib \
    LATENTSERVE_MODELS_DIR=/models
USER 10001:10001
ENTRYPOINT ["python", "-m", "training"]
# Without a terminal it prints a progress line per model every 15 s (docker compose logs -f trainer).
CMD ["build-defaults", "--models-dir", "/models", "--runs-dir", "/tmp/runs"]

# ---------------------------------------------------------------------------------------------------
FROM base AS runtime
COPY --from=service-build /opt/venv /opt/venv
COPY --chown=app:app models/ /models/
# Settings come from the environment (prefix LATENTSERVE_, see README.md); these are the defaults.
ENV LATENTSERVE_MODELS_DIR=/models \
    LATENTSERVE_HOST=0.0.0.0 \
    LATENTSERVE_PORT=8000
USER 10001:10001
EXPOSE 8000
# Ready = every model loaded (503 before). python's urllib: slim images have no curl.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('LATENTSERVE_PORT', '8000'), timeout=4)"]
# Exec form: the server is PID 1 and gets SIGTERM itself. It then answers /ready 503, serves on for
# LATENTSERVE_DRAIN_S (0), stops accepting connections, gives the requests in flight
# LATENTSERVE_TIMEOUT_GRACEFUL_SHUTDOWN (8 s) and answers 503 to those still unfinished (within 1 s):
# at most 9 s, inside a plain `docker stop`'s 10 s before SIGKILL (docker-compose.yml: stop_grace_period;
# tests/test_deploy.py checks that these agree). Raise the grace period with the timeouts, never below.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "service"]
