# A training node: ranklog (rank side only) + CPU torch; runs the demo trainer under torchrun.
#
# Context: docker/, after docker/wheels.sh filled docker/.build/wheels. Nothing is fetched
# while building; every wheel comes from the context (pip --no-index).
#   docker build -f docker/rank.Dockerfile -t ranklog/rank docker
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

# torch and friends first, the project last: editing ranklog rebuilds only the final small layer.
COPY .build/wheels/rank/ /wheels/rank/
RUN pip install -q --no-index --find-links /wheels/rank /wheels/rank/*.whl
COPY .build/wheels/project/ /wheels/project/
RUN pip install -q --no-index --no-deps /wheels/project/*.whl \
    && python -c "import ranklog.demo, torch.distributed"

WORKDIR /tmp
CMD ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "ranklog.demo"]
