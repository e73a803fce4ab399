# The part every recipe image shares: NVIDIA's NGC PyTorch image (CUDA, torch, Transformer Engine) plus the
# biorecipes_shared package. Each recipe's Dockerfile builds FROM it. From the repository root:
#   docker build -f docker/base.Dockerfile -t biorecipes/base:latest .      # make docker-build does this first
# An exported recipe carries this file as Dockerfile.base and builds it from its own folder the same way.
ARG NGC_TAG=25.09-py3
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY shared/ /opt/biorecipes/shared/
# The image's CUDA torch stays: shared/ lists no torch requirement.
RUN pip install --no-cache-dir /opt/biorecipes/shared
