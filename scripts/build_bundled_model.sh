#!/usr/bin/env bash
# Rebuilds the bundled `tiny-shapes` model from scratch with clipcli's own commands: draw 40k captioned
# images, pre-train from scratch, then fine-tune the result at a lower learning rate.
# About 4 minutes to draw the images and 20 minutes to train on 2 CPU cores.
set -euo pipefail
work=${1:-build/tiny-shapes}
clipcli make-shapes "$work/train" --count 40000 --seed 1 --split seen --background varied
clipcli train "$work/train/pairs.csv" --arch tiny-shapes --steps 3000 --batch-size 128 \
    --lr 1e-3 --weight-decay 0.1 --seed 0 --val-fraction 0.02 --fp16 --resume \
    -o "$work/pretrained.pt"
clipcli train "$work/train/pairs.csv" --model "$work/pretrained.pt" --steps 2000 --batch-size 128 \
    --lr 4e-4 --weight-decay 0.1 --seed 1 --val-fraction 0.02 --fp16 --resume \
    -o clipcli/data/tiny-shapes.pt
