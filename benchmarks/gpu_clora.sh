#!/usr/bin/env bash
# CLoRA on one GPU at the paper's settings (item 5 of issue 18): SD1.5-sized random model in fp16,
# 512x512, 50 DDIM steps, the paper's schedule (updates below step 25, 20 refinements at 0/10/20),
# K = 1, 2, 4, 8 against a plain generation: seconds, x plain, UNet passes, peak GPU memory
# (torch.cuda.max_memory_allocated, the model included; goal: K = 8 within 24 GiB).
# Rows: the default, and the whole graph recorded on the prediction's pass (the memory lever).
# About 5 minutes on one H200; pass extra options through, e.g. --loras 8.
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/bench_clora.py --full --device cuda --dtype fp16 --size 512 --steps 50 \
    --paper-schedule --loras 1 2 4 8 --levers trimmed,truncated "$@"
