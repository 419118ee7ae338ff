# Runtime image of landmark-index for the Ray head and workers (the RayJob submitters use the Ray image).
# Dependencies come from requirements/gpu.lock (hashed, resolved by scripts/lock.sh). The torch and
# faiss-gpu wheels bring their own CUDA user-space libraries, so the base is a plain Python image: a
# CUDA base image would only duplicate them. The node needs an NVIDIA driver for the lock's CUDA 13
# torch build (it also runs faiss-gpu's CUDA 12 libraries).
# Python matches the lock's resolution (scripts/lock.sh: --python-version 3.11).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# wget for KubeRay's health probes; bash runs KubeRay's `ray start` command.
RUN apt-get update \
    && apt-get install -y --no-install-recommends bash wget ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# uid 1000 is the runAsUser of every manifest in k8s/; HOME is where Ray and torch put caches.
RUN useradd --uid 1000 --user-group --create-home --home-dir /home/ray --shell /bin/bash ray

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/home/ray \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN python -m venv /opt/venv

WORKDIR /app
# The dependency layer comes first and changes only with the lock, so code edits rebuild in seconds.
COPY requirements/gpu.lock requirements/gpu.lock
RUN pip install --no-cache-dir --require-hashes -r requirements/gpu.lock \
    && python -c "import faiss; faiss.StandardGpuResources"  # AttributeError on a CPU build
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
# The lock's faiss-gpu provides the module `faiss` in place of the base dependency faiss-cpu (which the lock
# omits: both in one environment conflict), so `pip check` may report that one requirement, and only that.
RUN pip install --no-cache-dir --no-deps . \
    && problems="$(pip check 2>&1 | grep -v -x -e 'No broken requirements found.' \
        -e 'landmark-index [^ ]* requires faiss-cpu, which is not installed.' || true)" \
    && if [ -n "$problems" ]; then echo "$problems" >&2; exit 1; fi
COPY jobs ./jobs

# Ray writes /tmp/ray and /dev/shm; the manifests mount emptyDirs there and on /home/ray because
# the root filesystem is read-only at run time.
USER 1000:1000
CMD ["bash"]
