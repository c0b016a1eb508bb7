#!/usr/bin/env bash
# The accelerator check: on a machine with a GPU (or TPU), strict equivalence and the request-pool
# benchmark of prompt lookup, in bfloat16 ("bf16") and float32 ("highest"), for SmolLM2-135M-Instruct
# and Gemma-3-270M. Results land in experiments/results/<study>/<machine>-<date>/ (the bench_batch_*
# studies, each naming its device, commit and command, and gpu_check, the equivalence tables). Exits
# non-zero on any MISMATCH. Usage, from the repository root after `make peers` (or any .venv with specdec):
#
#     bash experiments/gpu_check.sh            # PY=python3 bash experiments/gpu_check.sh elsewhere
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=$("$PY" -c "import sys; sys.path.insert(0, 'experiments'); from record_results import run_folder
print(run_folder('gpu_check'))")
mkdir -p "$OUT"
status=0
for model in smollm2-135m gemma3-270m; do
  for precision in bf16 highest; do
    log="$OUT/gpu_check_${model}_${precision}.txt"
    "$PY" -c "from specdec.bench import device_label; print('device:', device_label())" > "$log.tmp"
    if ! "$PY" -m specdec.cli check --model "$model" --precision "$precision" --method prompt_lookup --k 4 \
        --strict --batch-size 8 --humaneval 8 --max-new-tokens 64 >> "$log.tmp"; then
      status=1
    fi
    mv "$log.tmp" "$log"
    tail -1 "$log"
    "$PY" experiments/bench_batch.py --model "$model" --precision "$precision" --methods prompt_lookup \
      --schedules fixed --slots 1 8 --humaneval 16 --sharegpt 16 --new-tokens 64 \
      --results-name "bench_batch_prompt_lookup_${model}_${precision}"
  done
done
exit $status
