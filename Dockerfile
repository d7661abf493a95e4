# The project's image: every pipeline component and every PyTorchJob pod runs this, so no task
# pip-installs at start. Tag or digest per environment lives in config/<env>.yaml (image.*).
#   docker build -t ghcr.io/flywheel-ml/flywheel:0.1.0 .
# GPU clusters: build with a CUDA torch instead of the CPU wheel pinned in constraints.txt:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 ...
FROM python:3.11-slim

ARG TORCH_INDEX=""
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    MLFLOW_DISABLE_TELEMETRY=true GX_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 \
    HOME=/tmp XDG_CACHE_HOME=/tmp/.cache

WORKDIR /opt/flywheel
COPY pyproject.toml constraints.txt README.md ./
COPY pipelines ./pipelines
COPY components ./components
COPY training ./training
COPY serving ./serving
COPY config ./config
RUN if [ -n "$TORCH_INDEX" ]; then \
        grep -v '^torch==' constraints.txt > /tmp/constraints.txt && \
        pip install --index-url "$TORCH_INDEX" torch && \
        pip install -c /tmp/constraints.txt . ; \
    else \
        pip install -c constraints.txt . ; \
    fi

# Non-root, matching the PyTorchJob pods' runAsUser (training/pytorchjob.py).
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin flywheel
USER 10001
