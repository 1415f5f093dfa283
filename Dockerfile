# The trainer on a GPU node: PyTorch + CUDA from the official image, DALI, FFCV (and what it builds against),
# this project. Install steps: tools/install.sh, the same script .ci/run uses.
#
#   docker build -t pirl .
#   docker run --gpus all --ipc=host -v /data:/data -v /scratch/runs:/runs pirl \
#       --config train/configs/imagenet_r50.yaml --data.shards=/data/imagenet-shards --data.backend=dali
#
# The entry point is tools/docker_entry.py: `[accelerate launch flags --] [trainer arguments]`, all of them the
# trainer's without a `--` (docs/cluster.md: multi-node). It refuses to start when run.out_dir is not on a mounted
# host folder: runs/ is /runs here, so `-v HOST_FOLDER:/runs` keeps every config's runs/<name>. No VOLUME for /runs:
# an anonymous volume would satisfy that check while hiding the checkpoints in Docker's storage (and `--rm`
# deletes it).
# -devel, not -runtime: ffcv compiles its C extension at install time.
FROM pytorch/pytorch:2.14.1-cuda13.0-cudnn9-devel

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1
WORKDIR /opt/pirl
RUN ln -s /runs /opt/pirl/runs

COPY tools/install.sh tools/install.sh
RUN bash tools/install.sh system --clean

COPY . .
# The base image's torch 2.14.1 is constraints.txt's, so pip keeps it (no second multi-GB download).
RUN bash tools/install.sh python ".[dali,ffcv]"

ENTRYPOINT ["python", "tools/docker_entry.py"]
CMD ["--help"]
