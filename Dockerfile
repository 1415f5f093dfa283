# The trainer on a GPU node: PyTorch + CUDA from the official image, DALI, FFCV (and what it builds against),
# this project. Install steps: tools/install.sh, the same script .ci/run uses.
#
#   docker build -t pirl .
#   docker run --gpus all --ipc=host -v /data:/data pirl \
#       --config train/configs/imagenet_r50.yaml --data.shards=/data/imagenet-shards --data.backend=dali
#
# The entry point is `accelerate launch train/pirl.py`: arguments after the image name are the trainer's
# (multi-node: put accelerate's own flags in a config file, train/configs/accelerate/4nodes_8gpus.yaml).
# -devel, not -runtime: ffcv compiles its C extension at install time.
FROM pytorch/pytorch:2.14.1-cuda13.0-cudnn9-devel

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1
WORKDIR /opt/pirl

COPY tools/install.sh tools/install.sh
RUN bash tools/install.sh system --clean

COPY . .
# The base image's torch 2.14.1 is constraints.txt's, so pip keeps it (no second multi-GB download).
RUN bash tools/install.sh python ".[dali,ffcv]"

ENTRYPOINT ["accelerate", "launch", "train/pirl.py"]
CMD ["--help"]
