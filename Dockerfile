# Runtime image of landmark-index for the Ray head, the GPU workers and the RayJob submitters.
# The CUDA base matches torch's default PyPI build (torch 2.15 is built against CUDA 13.2). torch and
# faiss-gpu-cu12 bring their own CUDA user-space libraries as pip wheels; the node's driver must
# support CUDA 13.2 (which also runs faiss's CUDA 12 libraries).
ARG CUDA_IMAGE=nvidia/cuda:13.2.0-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

# bash runs KubeRay's `ray start` command, wget its health probes; python3-venv because Ubuntu's
# system Python refuses pip installs (PEP 668).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv bash wget ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# uid 1000 is the runAsUser of every manifest in k8s/; HOME is where Ray and torch put caches.
RUN userdel --remove ubuntu 2>/dev/null || true \
    && useradd --uid 1000 --user-group --create-home --home-dir /home/ray --shell /bin/bash ray

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/home/ray \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN python3 -m venv /opt/venv

# Pinned: the CUDA base above matches this torch build, and rayVersion in k8s/ matches this Ray.
ARG TORCH_VERSION=2.15.0
ARG RAY_VERSION=2.60.0

WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
# faiss-cpu is a core dependency and faiss-gpu-cu12 (the `gpu` extra) writes the same `faiss/`
# files, so the two overwrite each other. Uninstalling faiss-cpu deletes those shared files (the CUDA
# build's included), hence the forced reinstall of faiss-gpu-cu12 afterwards: then only the CUDA build
# is left. (`pip check` then reports the missing faiss-cpu requirement; that is intended.)
RUN pip install --no-cache-dir ".[gpu]" "torch==${TORCH_VERSION}" "ray[default]==${RAY_VERSION}" \
    && pip uninstall -y faiss-cpu \
    && pip install --no-cache-dir --force-reinstall --no-deps faiss-gpu-cu12 \
    && python -c "import faiss; faiss.StandardGpuResources"  # AttributeError on the CPU build
COPY jobs ./jobs

# Ray writes /tmp/ray and /dev/shm; the manifests mount emptyDirs there and on /home/ray because
# the root filesystem is read-only at run time.
USER 1000:1000
CMD ["bash"]
