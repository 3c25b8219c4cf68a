# The ranklog collector: ranklog[collector] (JSONL, TensorBoard, W&B backends), no torch.
#
# Context: docker/, after docker/wheels.sh filled docker/.build/wheels. Nothing is fetched
# while building; every wheel comes from the context (pip --no-index).
#   docker build -f docker/collector.Dockerfile -t ranklog/collector docker
#   ... --build-arg BASE_IMAGE=python:3.11-slim   (with a registry; default: docker/base-image.sh's)
ARG BASE_IMAGE=ranklog/python:3.11-bookworm
FROM ${BASE_IMAGE}

ENV VIRTUAL_ENV=/opt/ranklog \
    PATH=/opt/ranklog/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp
RUN python3 -m venv /opt/ranklog

# Dependencies first, the project last: editing ranklog rebuilds only the final small layer.
COPY .build/wheels/collector/ /wheels/collector/
RUN pip install -q --no-index --find-links /wheels/collector /wheels/collector/*.whl
COPY .build/wheels/project/ /wheels/project/
RUN pip install -q --no-index --no-deps /wheels/project/*.whl \
    && ranklog collect --help >/dev/null

WORKDIR /data
EXPOSE 5555
CMD ["ranklog", "collect", "--bind", "tcp://*:5555", "--allow-remote", "--output-dir", "/data"]
