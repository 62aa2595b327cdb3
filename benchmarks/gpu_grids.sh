#!/usr/bin/env bash
# The digits grids of README "Results" on one machine with a GPU and 16 cores, as one-job shards
# run 16 at a time by pool.py, each shard on one core of its own (one loader worker) and all on
# the one GPU (run.gpus=1). GRIDS picks the grids (default "ssl imbalance"):
#
#   ssl        ssl_digits.py: fixmatch flexmatch freematch softmatch rotation supervised
#              (SSL_METHODS), 2 and 4 labels per class (LABELS="1 2 4" adds 1)
#   rotation   ssl_digits.py: rotation (4-way), rotation_flip (6-way) and supervised,
#              1, 2 and 4 labels per class (issue 11's rotation >= supervised target)
#   imbalance  realworld_digits.py imbalance: the long-tailed methods
#   foreign    realworld_digits.py foreign: fixmatch flexmatch openmatch, 0/25/50/75 % foreign
#   active     active_digits.py: each seed's round 0 first, then one shard per seed and strategy
#              (and random with 20 and 30 labels), in a second pool once the first pool (every
#              grid's jobs, in GRIDS's order: list active first) is done
#
# over seeds 0 1 2, 300 steps (STEPS; SSL_STEPS for the ssl and rotation grids alone), e.g.
#   GRIDS="ssl imbalance" LABELS=1 SSL_STEPS=600 IMB_METHODS="fixmatch flexmatch:..."
# IMB_METHODS: the imbalance grid's --methods entries (default below). A 20-step smoke stage
# runs each kind of job first (seed 0) and stops everything if one fails (SMOKE=0 skips it).
# Tabulate afterwards (any machine), e.g.
#
#   python benchmarks/ssl_digits.py --labels 2 4 --seeds 0 1 2 --steps 300 --threads 1 \
#       --methods supervised rotation fixmatch flexmatch freematch softmatch --collect $W/ssl_*
#   python benchmarks/merge_seeds.py $W/imb_*.md          (and $W/for_*.md)
#   python benchmarks/active_digits.py --seeds 0 1 2 --steps 300 --workdir $W/active \
#       --out active_digits.md                            (reuses every finished training)
#
# Usage: [GRIDS="..."] bash benchmarks/gpu_grids.sh WORKDIR [MINUTES]   (python3 = the
# project's); MINUTES (8.5) bounds the whole script: no job starts in its last 1.5 minutes, and
# the last ones are killed. SET="override ..." adds Hydra overrides to every job (e.g. a tiny
# model to try the script on a CPU with DEVICE=run.gpus=0).
set -u
W=${1:?usage: gpu_grids.sh WORKDIR [MINUTES]}
TOTAL=${2:-8.5}
GRIDS=${GRIDS:-ssl imbalance}
LABELS=${LABELS:-2 4}  # labels per class of the ssl grid (rotation's: these and 1)
SSL_METHODS=${SSL_METHODS:-fixmatch flexmatch freematch softmatch rotation supervised}
IMB_METHODS=${IMB_METHODS:-flexmatch:supervised_loss=logit_adjusted fixmatch flexmatch fixmatch_da \
  debiaspl debiaspl:supervised_loss=logit_adjusted freematch softmatch fixmatch_balanced flexmatch_balanced}
STEPS=${STEPS:-300}
SMOKE=${SMOKE:-1}
DEVICE=${DEVICE:-run.gpus=1}  # DEVICE=run.gpus=0 tries the script on a CPU
SET="$DEVICE ${SET:-}"
HERE=$(cd "$(dirname "$0")" && pwd)
SLOTS=$(( $(nproc) < 16 ? $(nproc) : 16 ))
ACTIVE="python3 $HERE/active_digits.py --threads 1 --workdir"
mkdir -p "$W"

ssl() {  # $1 = steps, $2 = folder prefix, $3 = seeds, $4 = label counts, $5 = methods
  local seed n m
  for seed in $3; do
    for n in $4; do
      for m in $5; do
        echo "python3 $HERE/ssl_digits.py --labels $n --seeds $seed --steps $1 --threads 1" \
          "--methods $m --workdir $2/ssl_${m}_l${n}_s${seed} --set $SET"
      done
    done
  done
}

jobs() {  # $1 = steps, $2 = folder prefix, $3 = seeds, $4 = label counts (ssl), $5 = ssl steps
  local s=$1 p=$2 seed m r grid
  for grid in $GRIDS; do
    case $grid in
      active)
        for seed in $3; do
          echo "$ACTIVE $p/active --seeds $seed --steps $s --strategies --random-n --set $SET"
        done ;;
      ssl) ssl "${5:-$s}" "$p" "$3" "$4" "$SSL_METHODS" ;;
      rotation) ssl "${5:-$s}" "$p" "$3" "$(printf '%s\n' 1 $4 | sort -un | xargs)" \
        "rotation rotation_flip supervised" ;;
      imbalance)
        for seed in $3; do
          for m in $IMB_METHODS; do
            local f=${m//[:=]/-}
            echo "python3 $HERE/realworld_digits.py imbalance --methods $m --seeds $seed" \
              "--steps $s --threads 1 --workdir $p/imb_${f}_s${seed} --out $p/imb_${f}_s${seed}.md" \
              "--set $SET"
          done
        done ;;
      foreign)
        for seed in $3; do
          for m in fixmatch flexmatch openmatch; do
            for r in 0 0.25 0.5 0.75; do
              echo "python3 $HERE/realworld_digits.py foreign --methods $m --seeds $seed" \
                "--ratios $r --steps $s --threads 1 --workdir $p/for_${m}_r${r}_s${seed}" \
                "--out $p/for_${m}_r${r}_s${seed}.md --set $SET"
            done
          done
        done ;;
      *) echo "gpu_grids.sh: unknown grid '$grid' (ssl rotation imbalance foreign active)" >&2
         exit 2 ;;
    esac
  done
}

active_strategies() {  # $1 = steps, $2 = folder prefix, $3 = seeds: the second active stage
  local seed st
  [[ " $GRIDS " == *" active "* ]] || return 0
  for seed in $3; do
    for st in random margin margin-kcenter kcenter entropy; do
      echo "$ACTIVE $2/active --seeds $seed --steps $1 --strategies $st --random-n --set $SET"
    done
    for n in 20 30; do
      echo "$ACTIVE $2/active --seeds $seed --steps $1 --strategies --random-n $n --set $SET"
    done
  done
}

left() {  # minutes left to the script, minus $1
  python3 -c "print($TOTAL - $1 - $SECONDS / 60)"
}

pool() {  # $1 = job file, $2 = logs, then pool.py's deadline options
  python3 "$HERE/pool.py" --jobs "$1" --slots "$SLOTS" --logs "$2" "${@:3}"
}

# Smoke: seed 0, 2 labels per class (the rotation grid: 1), 20 steps each.
if [ "$SMOKE" != 0 ]; then
  jobs 20 "$W/smoke" 0 2 >"$W/smoke_jobs.txt"  # an unknown grid exits 2 here
  active_strategies 20 "$W/smoke" 0 | head -n 1 >"$W/smoke_jobs2.txt"
  {
    pool "$W/smoke_jobs.txt" "$W/smoke_logs" --start-by 0.5 --stop-at 2 &&
      pool "$W/smoke_jobs2.txt" "$W/smoke_logs2" --stop-at 1.5
  } >"$W/smoke_pool.log" 2>&1
  smoke=$?
  tail -n 20 "$W/smoke_pool.log"
  if [ $smoke -ne 0 ]; then
    for log in "$W"/smoke_logs*/*.log; do
      grep -q "Traceback\|Error\|error:" "$log" && { echo "== $log"; tail -n 25 "$log"; }
    done
    exit 1
  fi
fi

jobs "$STEPS" "$W" "0 1 2" "$LABELS" "${SSL_STEPS:-$STEPS}" >"$W/jobs.txt"
pool "$W/jobs.txt" "$W/logs" --start-by "$(left 1.5)" --stop-at "$(left 0)" 2>&1 | tail -n 70
active_strategies "$STEPS" "$W" "0 1 2" >"$W/jobs2.txt"
if [ -s "$W/jobs2.txt" ]; then
  pool "$W/jobs2.txt" "$W/logs2" --start-by "$(left 1.5)" --stop-at "$(left 0)" 2>&1 | tail -n 30
fi
