#!/usr/bin/env bash
# The GPU checks, run once on a single NVIDIA H200 (device lent to the session): the default command
# with the GPU profile (the papers' settings: 256x256, batch 8, 100 epochs) for both methods on the
# built-in synthetic zipper, timed end to end. Logs and metrics go to $OUT.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results/gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$OUT/machine.txt"
for method in mvad idif; do
  start=$(date +%s)
  timeout 250 python3 train.py --method "$method" --category zipper --out "runs/gpu_$method" --workers 4 2>&1 \
    | tr '\r' '\n' | grep -v '%|' > "$OUT/train_$method.log"
  echo "$method: exit ${PIPESTATUS[0]}, $(( $(date +%s) - start )) s wall" | tee -a "$OUT/machine.txt"
  tail -n 25 "$OUT/train_$method.log"
  cp "runs/gpu_$method/metrics.json" "$OUT/metrics_$method.json" 2>/dev/null
done
