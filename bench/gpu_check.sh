#!/usr/bin/env bash
# The GPU checks, for a machine with an NVIDIA GPU (one H200 when one was lent to a session):
# 1. bench/attention.py on CUDA: today's MVAS against the fast one, MVAS against dense (fused and naive);
# 2. the default command (the GPU profile: the papers' 256x256, batch 8, 100 epochs) on the built-in
#    synthetic zipper for each method in $METHODS and each variant in $VARIANTS:
#      fp32     eager float32 (the default)
#      bf16     --precision bf16 (bf16 autocast in training and evaluation)
#      compile  --compile (torch.compile with CUDA graphs, mode reduce-overhead)
#    timed end to end, each run cut at $LIMIT seconds; then a table of wall time, seconds per epoch
#    (median over the epochs after the second: compile's warm-up excluded) and the metrics.
# Logs, metrics and the table go to $OUT. Every run of 2. takes about 2 to 4 minutes on an H200: size
# METHODS, VARIANTS and LIMIT to the device time at hand, e.g. METHODS=mvad for the MVAS blocks alone.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results/gpu}; mkdir -p "$OUT"
METHODS=${METHODS:-"mvad idif"}
VARIANTS=${VARIANTS:-"fp32 bf16 compile"}
LIMIT=${LIMIT:-300}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$OUT/machine.txt"

python3 bench/attention.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/attention.log" | grep -v '^$' | head -n 12

for method in $METHODS; do
  for variant in $VARIANTS; do
    case $variant in
      fp32) flags="" ;;
      bf16) flags="--precision bf16" ;;
      compile) flags="--compile" ;;
    esac
    run="runs/gpu_${method}_${variant}"
    start=$(date +%s)
    # shellcheck disable=SC2086  # $flags is a list of words
    timeout "$LIMIT" python3 train.py --method "$method" --category zipper --out "$run" --workers 4 $flags 2>&1 \
      | tr '\r' '\n' | grep -v '%|' > "$OUT/train_${method}_${variant}.log"
    echo "$method $variant: exit ${PIPESTATUS[0]}, $(( $(date +%s) - start )) s wall" | tee -a "$OUT/runs.txt"
    cp "$run/metrics.json" "$OUT/metrics_${method}_${variant}.json" 2>/dev/null
    cp "$run/history.json" "$OUT/history_${method}_${variant}.json" 2>/dev/null
  done
done

OUT="$OUT" python3 - <<'EOF' | tee "$OUT/summary.txt"
import json, os, re, statistics
from pathlib import Path
out = Path(os.environ["OUT"])
print(f"{'run':24s} {'wall s':>7s} {'s/epoch':>8s} {'sample AUROC/AP':>16s} {'image AUROC':>12s} {'pixel AUROC/AU-PRO':>19s}")
for line in (out / "runs.txt").read_text().splitlines():
    method, variant, wall = re.match(r"(\S+) (\S+): exit \S+ (\d+) s wall", line).groups()
    history, metrics = out / f"history_{method}_{variant}.json", out / f"metrics_{method}_{variant}.json"
    epochs = [h["seconds"] for h in json.loads(history.read_text())] if history.is_file() else []
    per_epoch = f"{statistics.median(epochs[2:] or epochs):.2f}" if epochs else "-"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        cells = (f"{100 * m['sample']['auroc']:.1f} / {100 * m['sample']['ap']:.1f}", f"{100 * m['image']['auroc']:.1f}",
                 f"{100 * m['pixel']['auroc']:.1f} / {100 * m['pixel']['aupro']:.1f}")
    else:
        cells = ("did not finish", "", "")
    print(f"{method + ' ' + variant:24s} {wall:>7s} {per_epoch:>8s} {cells[0]:>16s} {cells[1]:>12s} {cells[2]:>19s}")
EOF
