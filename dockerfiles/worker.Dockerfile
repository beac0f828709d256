# Prefect worker for the login node: submits and watches Slurm jobs (submitit + Slurm client tools).
#   docker build -f dockerfiles/worker.Dockerfile -t REGISTRY/gpt2-repro-worker:VERSION .
#   docker run -e PREFECT_API_URL=... -v /etc/slurm:/etc/slurm:ro -v /run/munge:/run/munge REGISTRY/gpt2-repro-worker:VERSION
# The worker needs the cluster's slurm.conf and munge socket (mounted) and a shared folder for submitit logs.
FROM python:3.11.11-slim-bookworm

# Slurm client (sbatch/squeue/sacct/scontrol) and munge, matching Debian 12's slurm 22.05
RUN apt-get update \
    && apt-get install -y --no-install-recommends slurm-client=22.05.8-4+deb12u3 munge=0.5.15-2+deb12u1 \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/gpt2-repro

# The worker validates configs and data (imports torch) but never trains: the CPU build is enough.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.7.1

COPY pyproject.toml README.md ./
# the tracker mirror's libraries (tracker=mlflow|wandb) live here, never on the training nodes
RUN mkdir -p common training evaluation data_prep cluster flows tracking \
    && touch common/__init__.py training/__init__.py evaluation/__init__.py data_prep/__init__.py cluster/__init__.py \
       flows/__init__.py tracking/__init__.py \
    && pip install -e ".[trackers]" "prefect>=3.4,<4"

COPY configs ./configs
COPY common ./common
COPY training ./training
COPY evaluation ./evaluation
COPY data_prep ./data_prep
COPY cluster ./cluster
COPY flows ./flows
COPY tracking ./tracking
RUN pip install --no-deps -e . \
    && useradd --create-home --uid 1000 --shell /bin/bash prefect
USER 1000

# `--with-healthcheck` serves /health on 8080; the pool name matches prefect.yaml's work pool.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4).status != 200)"]
CMD ["prefect", "worker", "start", "--pool", "gpt2-slurm", "--type", "process", "--with-healthcheck"]
