#!/usr/bin/env bash
# The GPU checks, for a machine with an NVIDIA GPU; about 8 minutes on one H100 with the defaults:
# 1. bench/device_check.py on CUDA (1-2 min): for each method a training epoch and an evaluation in fp32
#    and in bf16, what --precision auto chooses there, and the float32 anomaly maps and losses under bf16
#    autocast; PASS/FAIL lines, exit status 1 on a FAIL (this script goes on and reports it at the end);
#    then the suite's CUDA tests (tests/test_train.py -k cuda: each method's tiny run in fp32 and bf16; skipped
#    where no GPU is present), well under a minute;
# 2. bench/attention.py on CUDA: today's MVAS against the fast one, MVAS against dense (fused and naive),
#    cut at $ATTENTION_LIMIT seconds (default 120);
# 3. the default command (the GPU profile: the papers' 256x256, batch 8) on the built-in synthetic zipper,
#    generated first (not timed), for each method in $METHODS and each variant in $VARIANTS, with
#    --epochs $EPOCHS (default 10 of the papers' 100, to fit the time; EPOCHS=100 for the full command):
#      fp32     --precision fp32
#      auto     the default: bf16 autocast where the GPU computes bf16 (compute capability 8.0 on)
#      bf16     --precision bf16
#      compile  --compile (torch.compile with CUDA graphs, mode reduce-overhead)
#    timed end to end, each run cut at $LIMIT seconds (default 75); then a table of wall time, seconds per
#    epoch (median over the epochs after the second: compile's warm-up excluded) and the metrics.
# Logs, metrics and the table go to $OUT. Size METHODS, VARIANTS, EPOCHS and LIMIT to the device time at hand.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results/gpu}; mkdir -p "$OUT"
METHODS=${METHODS:-"mvad idif"}
VARIANTS=${VARIANTS:-"fp32 auto"}
EPOCHS=${EPOCHS:-10}
LIMIT=${LIMIT:-75}
ATTENTION_LIMIT=${ATTENTION_LIMIT:-120}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$OUT/machine.txt"

python3 bench/device_check.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/device_check.log" | grep -E '^(PASS|FAIL|all|[0-9]+ of)'
checks=${PIPESTATUS[0]}
python3 -m pytest -q -p no:cacheprovider tests/test_train.py -k cuda 2>&1 | tee "$OUT/cuda_tests.log" | tail -n 3
[ "${PIPESTATUS[0]}" -eq 0 ] || checks=1  # a failed CUDA test fails the script as a failed check does

timeout "$ATTENTION_LIMIT" python3 bench/attention.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/attention.log" \
  | grep -v '^$' | head -n 12

python3 -c "import synthetic; synthetic.synthetic_root('zipper')"  # the default command's data, untimed
for method in $METHODS; do
  for variant in $VARIANTS; do
    case $variant in
      fp32) flags="--precision fp32" ;;
      auto) flags="" ;;
      bf16) flags="--precision bf16" ;;
      compile) flags="--compile" ;;
    esac
    run="runs/gpu_${method}_${variant}"
    start=$(date +%s)
    # shellcheck disable=SC2086  # $flags is a list of words
    timeout "$LIMIT" python3 train.py --method "$method" --category zipper --out "$run" --workers 4 \
      --epochs "$EPOCHS" $flags 2>&1 | tr '\r' '\n' | grep -v '%|' > "$OUT/train_${method}_${variant}.log"
    echo "$method $variant: exit ${PIPESTATUS[0]}, $(( $(date +%s) - start )) s wall" | tee -a "$OUT/runs.txt"
    cp "$run/metrics.json" "$OUT/metrics_${method}_${variant}.json" 2>/dev/null
    cp "$run/history.json" "$OUT/history_${method}_${variant}.json" 2>/dev/null
  done
done

OUT="$OUT" python3 - <<'EOF' | tee "$OUT/summary.txt"
import json, os, re, statistics
from pathlib import Path
out = Path(os.environ["OUT"])
print(f"{'run':24s} {'precision':>9s} {'wall s':>7s} {'s/epoch':>8s} {'sample AUROC/AP':>16s} {'image AUROC':>12s} "
      f"{'pixel AUROC/AU-PRO':>19s}")
for line in (out / "runs.txt").read_text().splitlines():
    method, variant, wall = re.match(r"(\S+) (\S+): exit \S+ (\d+) s wall", line).groups()
    history, metrics = out / f"history_{method}_{variant}.json", out / f"metrics_{method}_{variant}.json"
    history = json.loads(history.read_text()) if history.is_file() else []
    epochs = [h["seconds"] for h in history]
    per_epoch = f"{statistics.median(epochs[2:] or epochs):.2f}" if epochs else "-"
    precision = history[-1].get("precision", "-") if history else "-"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        cells = (f"{100 * m['sample']['auroc']:.1f} / {100 * m['sample']['ap']:.1f}", f"{100 * m['image']['auroc']:.1f}",
                 f"{100 * m['pixel']['auroc']:.1f} / {100 * m['pixel']['aupro']:.1f}")
    else:
        cells = ("did not finish", "", "")
    print(f"{method + ' ' + variant:24s} {precision:>9s} {wall:>7s} {per_epoch:>8s} {cells[0]:>16s} {cells[1]:>12s} "
          f"{cells[2]:>19s}")
EOF
[ "$checks" -eq 0 ] && echo "device checks: all passed" || echo "device checks: FAILED (see $OUT/device_check.log and cuda_tests.log)"
exit "$checks"
