#!/usr/bin/env bash
# Times the README's road on a machine without the project: a fresh clone, `pip install -e .`, ImageNet-layout
# shards (class folders for train, a flat val folder with Kaggle's CSV) and the first training step.
#
#   tools/fresh_clone_bench.sh REPOSITORY PHOTOS [WORKDIR]
#
# PHOTOS holds train/<wnid>/ and test/<wnid>/ class folders of JPEGs (Imagenette's layout); 4 classes of it become
# a tiny ImageNet: 40 training photos a class, and 10 a class renamed ILSVRC2012_val_*.JPEG into one flat folder.
set -euo pipefail
REPOSITORY=${1:?usage: tools/fresh_clone_bench.sh REPOSITORY PHOTOS [WORKDIR]}
PHOTOS=$(cd "${2:?usage: tools/fresh_clone_bench.sh REPOSITORY PHOTOS [WORKDIR]}" && pwd)
WORK=${3:-$(mktemp -d)}
mkdir -p "$WORK/ILSVRC/Data/CLS-LOC/train" "$WORK/ILSVRC/Data/CLS-LOC/val"
cd "$WORK"
echo "ImageId,PredictionString" > LOC_val_solution.csv
n=0
for wnid in $(ls "$PHOTOS/train" | head -4); do
    mkdir "ILSVRC/Data/CLS-LOC/train/$wnid"
    for f in $(ls "$PHOTOS/train/$wnid" | head -40); do cp "$PHOTOS/train/$wnid/$f" "ILSVRC/Data/CLS-LOC/train/$wnid/"; done
    for f in $(ls "$PHOTOS/test/$wnid" | head -10); do
        n=$((n + 1))
        id=$(printf "ILSVRC2012_val_%08d" "$n")
        cp "$PHOTOS/test/$wnid/$f" "ILSVRC/Data/CLS-LOC/val/$id.JPEG"
        echo "$id,$wnid 1 2 100 120 $wnid 5 6 50 60" >> LOC_val_solution.csv  # Kaggle's: class, then a box, per box
    done
done

start=$(date +%s)
git clone -q "$REPOSITORY" repo && cd repo
python3 -m venv .venv && . .venv/bin/activate
pip install -q -e .
installed=$(date +%s)
python tools/make_shards.py --input ../ILSVRC/Data/CLS-LOC/train --output shards/train
python tools/make_shards.py --input ../ILSVRC/Data/CLS-LOC/val --labels ../LOC_val_solution.csv --classes shards/train \
    --output shards/val
sharded=$(date +%s)
# The demo's small recipe; 160 photos hold fewer rows than its 512 negatives.
python train/pirl.py --config train/configs/cpu_small.yaml --data.shards=shards/train --run.out_dir=runs/first_step \
    --run.max_steps=1 --run.log_every=1 --loss.num_negatives=128
stepped=$(date +%s)
echo "clone + install $((installed - start)) s, shards $((sharded - installed)) s," \
     "first step (start-up, bank initialisation, step) $((stepped - sharded)) s: $((stepped - start)) s in all"
