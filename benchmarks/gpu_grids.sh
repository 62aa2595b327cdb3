#!/usr/bin/env bash
# The digits grids of README "Results" on one machine with a GPU and 16 cores: every (method,
# labels per class, seed) of ssl_digits.py, then the long-tailed grid of realworld_digits.py, as
# one-job shards run 16 at a time by pool.py, each shard on one core of its own (one loader
# worker) and all on the one GPU (run.gpus=1). A 20-step smoke stage runs each kind of job first
# and stops everything if one fails. Tabulate afterwards (any machine):
#
#   python benchmarks/ssl_digits.py --labels 2 4 --seeds 0 1 2 --steps 300 --threads 1 \
#       --methods supervised rotation fixmatch flexmatch freematch softmatch --collect $W/ssl_*
#
# Usage: bash benchmarks/gpu_grids.sh WORKDIR [MINUTES]   (python3 = the project's); MINUTES (8.5)
# bounds the whole script: no job starts in its last 1.5 minutes, and the last ones are killed.
set -u
W=${1:?usage: gpu_grids.sh WORKDIR [MINUTES]}
TOTAL=${2:-8.5}
DEVICE=${DEVICE:-run.gpus=1}  # DEVICE=run.gpus=0 tries the script on a CPU
HERE=$(cd "$(dirname "$0")" && pwd)
SLOTS=$(( $(nproc) < 16 ? $(nproc) : 16 ))
mkdir -p "$W"

jobs() {  # $1 = steps, $2 = folder prefix, $3 = seeds, $4 = label counts
  local s=$1 p=$2 seed n m
  for seed in $3; do
    for n in $4; do
      for m in fixmatch flexmatch freematch softmatch rotation supervised; do
        echo "python3 $HERE/ssl_digits.py --labels $n --seeds $seed --steps $s --threads 1" \
          "--methods $m --workdir $p/ssl_${m}_l${n}_s${seed} --set $DEVICE"
      done
    done
  done
  for seed in $3; do
    for m in flexmatch:supervised_loss=logit_adjusted fixmatch flexmatch fixmatch_da debiaspl \
        debiaspl:supervised_loss=logit_adjusted freematch softmatch; do
      local f=${m//[:=]/-}
      echo "python3 $HERE/realworld_digits.py imbalance --methods $m --seeds $seed --steps $s" \
        "--threads 1 --workdir $p/imb_${f}_s${seed} --out $p/imb_${f}_s${seed}.md --set $DEVICE"
    done
  done
}

# Smoke: one seed, 2 labels per class, the first long-tailed seed; 20 steps each.
jobs 20 "$W/smoke" 0 2 >"$W/smoke_jobs.txt"
python3 "$HERE/pool.py" --jobs "$W/smoke_jobs.txt" --slots "$SLOTS" --logs "$W/smoke_logs" \
  --start-by 0.5 --stop-at 2 >"$W/smoke_pool.log" 2>&1
smoke=$?
tail -n 20 "$W/smoke_pool.log"
if [ $smoke -ne 0 ]; then
  for log in "$W"/smoke_logs/*.log; do
    grep -q "Traceback\|Error\|error:" "$log" && { echo "== $log"; tail -n 25 "$log"; }
  done
  exit 1
fi

jobs 300 "$W" "0 1 2" "2 4" >"$W/jobs.txt"
python3 "$HERE/pool.py" --jobs "$W/jobs.txt" --slots "$SLOTS" --logs "$W/logs" \
  --start-by "$(python3 -c "print($TOTAL - 1.5 - $SECONDS / 60)")" \
  --stop-at "$(python3 -c "print($TOTAL - $SECONDS / 60)")" 2>&1 | tail -n 70
