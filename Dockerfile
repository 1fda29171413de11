# nvkg trainer image: `make docker` (CPU torch, nvkg:latest) or `make docker-gpu` (nvkg:latest-gpu), which is
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t nvkg:latest-gpu .
# The two differ only in torch's wheel. The CUDA wheels carry the CUDA runtime, cuDNN and NCCL (the nvidia-*
# packages torch depends on) and the driver comes from the host through the NVIDIA container toolkit
# (`docker run --gpus all`, the Kubernetes device plugin), so a CUDA base image would add nothing torch uses.
#
# No ENTRYPOINT: Ray's cluster launcher starts a container as `docker run ... IMAGE bash` and KubeRay gives
# its own command, so the image is an environment with `nvkg` on PATH:
#   docker run --rm nvkg:latest nvkg train --dataset nations --out runs/nations
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# gcc: the CPU kernels (sharding/kernels/*.c, built on first use for the CPU that runs them; without a
# compiler torch ops do the work). rsync and ssh: Ray's cluster launcher copies its bootstrap files into
# the head's container with rsync, and the head's autoscaler reaches the workers over ssh.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev rsync openssh-client \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/nvkg
COPY requirements.txt .
# torch first from the chosen index (CPU or CUDA wheel of the pinned release), then the rest.
RUN pip install --index-url "${TORCH_INDEX}" "$(grep '^torch==' requirements.txt)" \
    && pip install -r requirements.txt

# The package (its dependencies are requirements.txt's, installed above); the run configs it ships are
# linked at /opt/nvkg/configs.
COPY pyproject.toml README.md src/
COPY trainer/ src/trainer/
COPY sharding/ src/sharding/
COPY storage/ src/storage/
COPY configs/ src/configs/
RUN pip install --no-deps ./src \
    && rm -rf src \
    && ln -s "$(nvkg configs)" configs

RUN useradd --create-home --uid 1000 nvkg
USER nvkg
WORKDIR /home/nvkg
CMD ["nvkg", "train", "--config", "/opt/nvkg/configs/default.yaml", "--out", "runs/default"]
