# nvkg trainer image. CPU by default; for CUDA build with
#   docker build --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# (a CUDA base needs python3.11 and python3.11-venv installed; see README "GPU install").
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

# A C compiler for the CPU kernels (sharding/kernels/*.c; built on first use for the CPU that runs them);
# without one, torch ops do the work.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/nvkg
COPY requirements.txt .
# torch first from the chosen index (CPU or CUDA wheel of the pinned release), then the rest.
RUN pip install --index-url "${TORCH_INDEX}" "$(grep '^torch==' requirements.txt)" \
    && pip install -r requirements.txt

COPY trainer/ trainer/
COPY sharding/ sharding/
COPY storage/ storage/
COPY configs/ configs/

RUN useradd --create-home nvkg
USER nvkg
ENTRYPOINT ["python", "-m", "trainer"]
CMD ["train", "--config", "configs/default.yaml", "--out", "/tmp/nvkg-run"]
