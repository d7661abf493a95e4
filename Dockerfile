# The project's image: every pipeline component, training pod and serving pod runs this, so no task
# pip-installs at start. Tag or digest per environment lives in config/<env>.yaml (image.*).
#   docker build -t ghcr.io/flywheel-ml/flywheel:0.1.0 .
# constraints.txt pins the CPU build of torch (torch==2.13.0+cpu), which lives on PyTorch's CPU
# index, not PyPI. GPU clusters: build with the CUDA index instead (same torch version):
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 ...
FROM python:3.11-slim

ARG TORCH_INDEX=""
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    MLFLOW_DISABLE_TELEMETRY=true GX_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 \
    HOME=/tmp XDG_CACHE_HOME=/tmp/.cache \
    FLYWHEEL_SERVING_HOST=0.0.0.0
# FLYWHEEL_SERVING_HOST: the predictor and transformer (serving/server.py --host) bind every
# interface in a pod, where the kubelet's probes and the other pods reach them; run on a machine
# they bind 127.0.0.1 (the local deployer passes --host 127.0.0.1 even in this image).

WORKDIR /opt/flywheel
COPY pyproject.toml constraints.txt README.md ./
COPY specs ./specs
COPY storage ./storage
COPY crds ./crds
COPY model ./model
COPY gateways ./gateways
COPY stages ./stages
COPY training ./training
COPY serving ./serving
COPY monitoring ./monitoring
COPY deployment ./deployment
COPY fleet ./fleet
COPY components ./components
COPY pipelines ./pipelines
COPY config ./config
RUN if [ -n "$TORCH_INDEX" ]; then \
        grep -v '^torch==' constraints.txt > /tmp/constraints.txt && \
        pip install --index-url "$TORCH_INDEX" torch==2.13.0 && \
        pip install -c /tmp/constraints.txt . ; \
    else \
        pip install --extra-index-url "$TORCH_CPU_INDEX" -c constraints.txt . ; \
    fi

# KFP's launcher creates its local artifact mount points as the task's (non-root) user.
RUN mkdir -p /gcs /minio /s3 && chown 10001 /gcs /minio /s3

# Non-root, matching the training pods' runAsUser (training/pods.py).
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin flywheel
USER 10001
