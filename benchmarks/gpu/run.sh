#!/usr/bin/env bash
# Posterior C2ST of Two Moons and the Gaussian mixture at 1e4 simulations with a GPU-sized
# configuration (batch 1000, the reference's; width 64 and 128), three seeds each, PARALLEL runs
# at a time on one GPU. Made for a lent H100/H200 machine whose session time is short: every
# run has a wall-clock training budget (TrainingConfig.max_time, recorded in the CSV's
# settings) and the whole script a deadline. Runs share the GPU by time-slicing: on an H200,
# twelve at once had not finished training after 8.5 minutes, where one alone trained,
# compilation included, in under 2.5 minutes (2026-11-27).
#
#   OUT=/tmp/gpu bash benchmarks/gpu/run.sh            # writes $OUT/gpu.csv and $OUT/log.txt
#
# Variables: TASKS, SEEDS, WIDTHS, PARALLEL (runs at a time), MAX_TIME (training seconds per
# run), DEADLINE (seconds for everything; runs still going then are stopped and named in the
# log), EXTRA (more run.py arguments, e.g. "--num-samples 500" for a dry run on a CPU).
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
OUT=${OUT:?set OUT to the folder for gpu.csv and log.txt}
TASKS=${TASKS:-"two_moons gaussian_mixture"}
SEEDS=${SEEDS:-"0 1 2"}
WIDTHS=${WIDTHS:-"64 128"}
PARALLEL=${PARALLEL:-2}
MAX_TIME=${MAX_TIME:-300}
DEADLINE=${DEADLINE:-540}
EXTRA=${EXTRA:-}
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several processes share the GPU
export JAX_DEFAULT_MATMUL_PRECISION=highest  # float32 matmuls as on a CPU, not TF32
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
mkdir -p "$OUT" /tmp/gpu_logs
start=$SECONDS

$PY -c "import jax; print('devices:', jax.devices())" || exit 1
# Fail in seconds, not after training, when the observations or references cannot be read.
# shellcheck disable=SC2086
$PY - $TASKS <<'EOF' || exit 1
import sys
from numpyro_simformer import tasks
for name in sys.argv[1:]:
    task = getattr(tasks, name)()
    for number in (1, 2, 3):
        task.observation(number), task.reference_posterior_samples(number)
print("observations and references readable:", *sys.argv[1:])
EOF

names=()
for task in $TASKS; do
  for width in $WIDTHS; do
    for seed in $SEEDS; do
      while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ] && [ $((SECONDS - start)) -lt "$DEADLINE" ]; do sleep 2; done
      name=gpu_${task}_w${width}_s${seed}
      if [ $((SECONDS - start)) -ge "$DEADLINE" ]; then echo "deadline reached before $name started"; continue; fi
      names+=("$name")
      rm -f "benchmarks/results/$name.csv"
      # shellcheck disable=SC2086
      $PY benchmarks/run.py --name "$name" --tasks "$task" --budgets 10000 --attention dense --seeds "$seed" \
          --observations 1 2 3 --mlp-early-stopping --training batch_size=1000 max_time=$MAX_TIME \
          --network width=$width mlp_width=$((2 * width)) $EXTRA >"/tmp/gpu_logs/$name.log" 2>&1 &
    done
  done
done

while [ -n "$(jobs -rp)" ] && [ $((SECONDS - start)) -lt "$DEADLINE" ]; do sleep 5; done
for pid in $(jobs -rp); do echo "deadline ${DEADLINE} s reached: stopping pid $pid"; kill -- "$pid"; done

for name in "${names[@]}"; do echo "=== $name"; cat "/tmp/gpu_logs/$name.log"; done >"$OUT/log.txt"
$PY - "$OUT/gpu.csv" "${names[@]}" <<'EOF'
import csv, sys
sys.path.insert(0, "benchmarks")
import run
out, names = sys.argv[1], sys.argv[2:]
rows, finished = [], 0
for name in names:
    path = run.RESULTS / f"{name}.csv"
    if path.exists():
        rows += list(csv.DictReader(path.open()))
        finished += 1
with open(out, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=run.FIELDS)
    writer.writeheader()
    writer.writerows(rows)
print(f"{len(rows)} rows from {finished} of {len(names)} runs")
EOF
echo "total $((SECONDS - start)) s"
