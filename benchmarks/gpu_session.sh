#!/usr/bin/env bash
# One short GPU loan, used once (issues 16 and 18): everything that needs the GPU in one command,
# each part time-boxed so a slow part cannot starve the next, each writing into OUT as it goes.
#
#   1. the lab world: the committed base continued on the GPU (batch 256, stopped by a time limit)
#      and as many of its LoRAs as the box holds (a LoRA takes about 80 s there, launch-bound, about
#      what the CPU takes; the first loan got one); the world comes back as OUT/world.tgz, and
#      `lab --train --world DIR` on the CPU trains the missing LoRAs and measures the gates;
#   2. the merge of 2, 4 and 12 LoRAs into a random full-size SD1.5 at the paper's settings
#      (20 steps at 512 px, 50 iterations), policy auto (float64 where the device has it at full
#      rate, as an H200 does), then K = 12 with the float32 policy consumer GPUs get;
#   3. CLoRA at 512 px, 50 DDIM steps, the paper's schedule, K = 1, 2, 4, 8 against plain, fp16,
#      with peak memory; the default row and the masks-only mode.
#
#   bash benchmarks/gpu_session.sh OUT [TRAIN_SECONDS] [DEADLINE_SECONDS]
# Every part ends by DEADLINE_SECONDS (default 580, under the loan's 10-minute command limit):
# part i gets at most its own cap and never the time reserved for the parts after it.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_session.sh OUT [TRAIN_SECONDS] [DEADLINE_SECONDS]}
train_seconds=${2:-150}
deadline=${3:-580}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
started=$(date +%s)
elapsed() { echo "[gpu_session] $1 done at $(($(date +%s) - started)) s"; }
# boxed CAP RESERVE CMD...: CMD under a timeout of CAP seconds, less if the deadline minus RESERVE
# comes first; skipped when under 10 s would be left.
boxed() {
    local cap=$1 reserve=$2
    shift 2
    local left=$((deadline - ($(date +%s) - started) - reserve))
    local box=$((left < cap ? left : cap))
    if ((box < 10)); then echo "[gpu_session] skipped (no time left): $*"; return 1; fi
    timeout "$box" "$@"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" | tee -a "$out/gpu.txt"

world=/tmp/lab-world
rm -rf "$world" && mkdir -p "$world" && cp -r lib_loraclr/lab/trained/. "$world/"
boxed $((train_seconds + 150)) 250 python3 -m lib_loraclr lab --train --train-only --world "$world" \
    --device cuda --budget base_steps=1000000 base_batch=256 lora_steps=600 \
    --train-seconds "$train_seconds" 2>&1 | grep -v Warning | tee "$out/lab_train.log"
tar czf "$out/world.tgz" -C "$world" --exclude=cache .
elapsed "lab world"

boxed 190 150 python3 benchmarks/bench_merge.py --full --device cuda --concepts 2 4 12 --max-memory 24GiB \
    2>&1 | tee "$out/bench_merge.log"
elapsed "merge, policy auto"
boxed 100 60 python3 benchmarks/bench_clora.py --full --device cuda --dtype fp16 --size 512 --steps 50 \
    --paper-schedule --loras 1 2 4 8 --levers trimmed,masks_only 2>&1 | tee "$out/bench_clora.log"
elapsed "clora"
boxed 90 0 python3 benchmarks/bench_merge.py --full --device cuda --concepts 12 --max-memory 24GiB \
    --precision float32 2>&1 | tee "$out/bench_merge_fp32.log"
elapsed "merge, policy float32"
