# syntax=docker/dockerfile:1
# The pipeline image: every KFP task and training pod runs it (and, while config names one image per
# env, the serving pods too: it is a superset of Dockerfile.serving), so no task pip-installs at start.
# `make image ENV=<env>` builds and pushes it and pins its digest in config/<env>.yaml (image.digest);
# by hand: docker buildx build --push -t ghcr.io/flywheel-ml/flywheel:0.1.0 .
#
# Torch: constraints.txt pins the CPU build (torch==2.13.0+cpu), which lives on PyTorch's CPU index,
# not PyPI. GPU clusters: the same torch version from PyTorch's CUDA index (make image passes it for
# an env that trains on nvidia.com/gpu; pipelines/images.py CUDA_TORCH_INDEX):
#   docker buildx build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 ...
#
# Base image: the official python:3.11-slim (Python 3.11.15, Debian trixie), pinned by the digest of
# its multi-platform index as docker-library/repo-info records it (repos/python/remote/3.11-slim.md at
# commit 2477d553d2fdfa57b4ec11f63c8376eca8b7a253). To bump: `docker buildx imagetools inspect
# python:3.11-slim` (the "Digest:" line) or that file's newest version, then replace the digest here and
# in Dockerfile.serving (tests/project/test_image.py requires the two to match).
FROM python:3.11-slim@sha256:90744cff8f32887f075c47d747a173ff333e9e98801667af93c357fa9f5e28ff AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true GX_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 \
    HOME=/tmp XDG_CACHE_HOME=/tmp/.cache \
    FLYWHEEL_SERVING_HOST=0.0.0.0 \
    PATH=/opt/venv/bin:$PATH
# FLYWHEEL_SERVING_HOST: the predictor and transformer (serving/server.py --host) bind every
# interface in a pod, where the kubelet's probes and the other pods reach them; run on a machine
# they bind 127.0.0.1 (the local deployer passes --host 127.0.0.1 even in this image).

# ---- builder: a virtual environment with the pinned dependencies, then the project ----------------
FROM base AS builder
ARG TORCH_INDEX=""
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml constraints.txt ./
# The dependencies alone first (pyproject's list, exact versions from constraints.txt), so a source
# change reuses this layer instead of reinstalling torch. The CUDA build takes torch from TORCH_INDEX
# and everything else with torch's CPU pin dropped from the constraints.
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt && \
    if [ -n "$TORCH_INDEX" ]; then \
        grep -v '^torch==' constraints.txt > /tmp/constraints.txt && \
        pip install --index-url "$TORCH_INDEX" torch==2.13.0 && \
        pip install -c /tmp/constraints.txt -r /tmp/requirements.txt ; \
    else \
        pip install --extra-index-url "$TORCH_CPU_INDEX" -c constraints.txt -r /tmp/requirements.txt ; \
    fi
COPY README.md ./
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
# --no-deps: every dependency is already in, at its pinned version; this adds only the packages.
RUN pip install --no-deps . && pip check

# ---- runtime: the venv and the config, no compilers, no build context -----------------------------
FROM base AS runtime
COPY --from=builder /opt/venv /opt/venv
WORKDIR /opt/flywheel
COPY config ./config
# The packages live in the venv's site-packages, so config/ is found by this variable, not beside them.
ENV FLYWHEEL_CONFIG_DIR=/opt/flywheel/config

# KFP's launcher creates its local artifact mount points as the task's (non-root) user.
# Non-root, matching the training pods' runAsUser (training/pods.py) and Pod Security `restricted`.
RUN mkdir -p /gcs /minio /s3 && chown 10001 /gcs /minio /s3 && \
    useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin flywheel
USER 10001

# Batch work: a KFP task or a training pod runs to completion and Kubernetes (the pod's exit status,
# the Training Operator's restart policy) owns its liveness; a Docker health probe would only add a
# process per interval. The serving image (Dockerfile.serving) has one.
HEALTHCHECK NONE
