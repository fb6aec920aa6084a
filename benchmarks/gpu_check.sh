#!/usr/bin/env bash
# benchmarks/gpu_check.sh: the one script a lent GPU runs (DESIGN.md, "On a lent GPU").
#
#   bash benchmarks/gpu_check.sh            # from the repository root; results under $OUT
#
# On the device machine (nothing prebuilt travels: the script builds there), one call:
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=570)
# Locally without a GPU (a dry run: the GPU parts are skipped, the report is still written):
#   OUT=/tmp/gc PYTHON=.venv/bin/python GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh
#
# Parts, in order, each under `timeout` with its own budget (seconds) and its own log:
#   env 20, build 60, ceilings 30, gpu-tests 100, kernel-tests 120, e2e 150, bench 150, pretrain 45
#   (sized from the first H200 run: build 36 s, gpu-tests > 60, kernel-tests 88, e2e 125, bench > 90),
#   then the report (20 s, always reserved). The total budget (GPU_CHECK_BUDGET_S, default 480)
#   caps them: a part gets min(its budget, what is left) and is skipped when that is under a
#   third of its budget. A failing or timed-out part is recorded and the next one runs. At 480 s the
#   last parts get what is left; GPU_CHECK_BUDGET_S=560 fits every part's budget.
#
# Results ($OUT, default ./gpu_check_out):
#   results.md   the report (printed last: the device reply carries the end of stdout)
#   parts.tsv    part, status (ok / failed rc=N / timed out after N s / skipped: reason), seconds, limit_s
#   env.json, ceilings.json, junit-gpu.xml, junit-kernels.xml, logs/<part>.log,
#   bench/ and e2e/ (`bertfast bench` folders), pretrain/ (the pretraining run folder)
#   With GPU_CHECK_PACK=1 (the default) everything is also packed into gpu_check.tar.gz (without
#   checkpoints) and only results.md, parts.tsv, env.json, ceilings.json, the archive and the two
#   speedup plots stay loose: the device returns at most 8 files from $OUT.
# Exit status: 0 when results.md was written (the parts' own failures are in it), 1 otherwise.
#
# benchmarks/RESULTS.md: paste each GPU run's results.md into it as one section, newest first,
# below the introduction. The section is self-contained:
#   ## GPU check: <card>, <YYYY-MM-DD HH:MM> UTC, commit <sha12>
#   - card / driver / memory, software versions, measured ceilings (bf16 GEMM TFLOP/s, copy GB/s),
#     the run (budget, total seconds)
#   ### Parts            (table: part, status, seconds, limit)
#   ### GPU tests        (table per suite: passed, failed, errors, skipped; failures by name)
#   ### Benchmarks       (`bertfast bench --preset small` table)
#   ### End-to-end pretraining throughput   (`bertfast bench --ops pretraining --preset small` table)
#   ### Pretraining run  (tokens/s, backends, losses from summary.json)
#   ### Logs of failed parts (last lines of each)
#
# Environment:
#   OUT                     where results go (default ./gpu_check_out)
#   PYTHON                  the interpreter (default python3); PYTHONPATH gets the repository root
#   GPU_CHECK_BUDGET_S      total seconds (default 480)
#   GPU_CHECK_BUDGET_<PART> one part's budget, e.g. GPU_CHECK_BUDGET_GPU_TESTS=120
#   GPU_CHECK_DRY_RUN=1     behave as without a CUDA device
#   GPU_CHECK_SKIP_BUILD=1  build part: no compile, only the import check and `bertfast info`
#   GPU_CHECK_COMMIT        the commit to report when the tree has no .git (the device copy has none)
#   GPU_CHECK_PACK=0        leave $OUT unpacked
#   GPU_CHECK_XDIST=N       pytest-xdist workers for the Triton kernel tests (default 8 when
#                           pytest-xdist is importable: compiling the kernels is CPU-bound; 0: off)
#   GPU_CHECK_FAKE_SLOW_PART=<part>   TEST-ONLY: that part sleeps first, to exercise the timeout
# Read-only on the card: nvidia-smi is only queried, never asked to change a setting.

set -uo pipefail

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
ROOT=$(dirname "$(dirname "$SCRIPT")")
PYTHON=${PYTHON:-python3}
REPORT_PY="$ROOT/benchmarks/gpu_check_report.py"
KILL_AFTER=10      # seconds between TERM and KILL of a part that outlives its limit
REPORT_BUDGET=20   # kept back for the report and the packing

# Each part's default budget in seconds, in running order.
PARTS=(env build ceilings gpu-tests kernel-tests e2e bench pretrain)
declare -A DEFAULT_BUDGET=(
    [env]=20 [build]=60 [ceilings]=30 [gpu-tests]=100 [kernel-tests]=120 [e2e]=150 [bench]=150 [pretrain]=45
)
declare -A NEEDS_CUDA=([ceilings]=1 [gpu-tests]=1 [kernel-tests]=1 [bench]=1 [e2e]=1 [pretrain]=1)

now() { date +%s.%N; }

# --------------------------------------------------------------------------------------------
# The parts' bodies. Each runs in a process of its own (`bash gpu_check.sh __part NAME`) under
# `timeout`, with the working directory at ROOT and stdout+stderr going to $OUT/logs/NAME.log.

part_env() {
    echo "== nvidia-smi (query only)"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi || echo "nvidia-smi exited with $?"
    else
        echo "nvidia-smi: not found"
    fi
    echo "== versions, card, commit -> env.json"
    "$PYTHON" "$REPORT_PY" --collect env "$OUT"
}

part_build() {
    if [[ ${GPU_CHECK_SKIP_BUILD:-0} == 1 ]]; then
        echo "== compile skipped (GPU_CHECK_SKIP_BUILD=1): import check and bertfast info only"
    else
        # An editable install, not `setup.py build_ext --inplace`: the Triton kernels live in the
        # top-level kernels/ folder and are importable as bertfast.kernels only through the install's
        # package mapping (the first device run, with PYTHONPATH alone, could not import them).
        # --no-index --no-build-isolation: the device reaches no package index.
        local pip=("$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index -e .)
        if [[ $GPU_CHECK_CUDA == 1 ]]; then
            echo "== BERTFAST_CUDA=1 ${pip[*]}"
            BERTFAST_CUDA=1 "${pip[@]}" || return
        else
            echo "== ${pip[*]} (BERTFAST_CUDA unset: _cuda built when nvcc is found)"
            env -u BERTFAST_CUDA "${pip[@]}" || return
        fi
    fi
    # `bertfast info` and the import check in one process: importing bertfast is most of the time.
    echo "== bertfast info, then the import check"
    "$PYTHON" - "$GPU_CHECK_CUDA" <<'EOF'
import importlib
import sys

from bertfast.cli import main

rc = main(["info"])
names = ["bertfast._C", "bertfast.kernels"] + (["bertfast._cuda"] if sys.argv[1] == "1" else [])
for name in names:
    importlib.import_module(name)
print("imported: bertfast, " + ", ".join(names))
sys.exit(rc or 0)
EOF
}

part_ceilings() {
    "$PYTHON" "$REPORT_PY" --collect ceilings "$OUT"
}

part_gpu_tests() {
    # a test file that fails to import is reported, and the other files still run
    "$PYTHON" -m pytest -q -m gpu tests -p no:cacheprovider -rfEs --continue-on-collection-errors \
        --junitxml="$OUT/junit-gpu.xml"
}

part_kernel_tests() {
    local workers=${GPU_CHECK_XDIST:-8} xdist=()
    if [[ $workers != 0 ]] && "$PYTHON" -c "import xdist" 2>/dev/null; then
        xdist=(-n "$workers")
    fi
    echo "== Triton kernel tests, compiled for the GPU (${xdist[*]:-no xdist})"
    "$PYTHON" -m pytest -q tests/triton_kernels -p no:cacheprovider -rfE "${xdist[@]}" \
        --junitxml="$OUT/junit-kernels.xml"
}

part_bench() {
    # small: one headline case per benchmark function, every implementation side by side (the
    # default preset is ~700 cases: more than one device call)
    # torch.compile cases compile for ~10-90 s each: left out here (BERTFAST_BENCH_NO_COMPILE=1);
    # a session with more device time runs them with `bertfast bench` directly.
    BERTFAST_BENCH_NO_COMPILE=1 "$PYTHON" -m bertfast.cli bench --preset small --out "$OUT/bench"
}

part_e2e() {
    BERTFAST_BENCH_NO_COMPILE=1 "$PYTHON" -m bertfast.cli bench --ops pretraining --preset small --out "$OUT/e2e"
}

part_pretrain() {
    "$PYTHON" -m bertfast.pretrain --model electra --size small --steps 30 --batch-size 64 --seq-len 128 \
        --out "$OUT/pretrain" --no-progress --no-plot --checkpoint-every 1000
}

run_part_body() {  # in the child process
    local name=$1
    cd "$ROOT" || exit 1
    if [[ ${GPU_CHECK_FAKE_SLOW_PART:-} == "$name" ]]; then
        echo "GPU_CHECK_FAKE_SLOW_PART=$name (test hook): sleeping past the budget"
        sleep 3600
    fi
    "part_${name//-/_}"
}

# --------------------------------------------------------------------------------------------
# The driver

record() {  # record NAME STATUS SECONDS LIMIT
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$OUT/parts.tsv"
    printf '[%4d s] %-13s %s (%s s)\n' "$SECONDS" "$1" "$2" "$3"
}

run_part() {  # run_part NAME [SKIP_REASON]
    local name=$1 skip=${2:-}
    local var budget log="$OUT/logs/$name.log"
    var="GPU_CHECK_BUDGET_$(tr 'a-z-' 'A-Z_' <<<"$name")"
    budget=${!var:-${DEFAULT_BUDGET[$name]}}
    if ! [[ $budget =~ ^[0-9]+$ ]] || ((budget < 1)); then
        echo "$var must be a whole number of seconds >= 1, got '$budget'" >"$log"
        record "$name" "skipped: bad $var='$budget'" 0 0
        return
    fi
    budget=$((10#$budget))  # "090" is ninety, not octal
    if [[ -n $skip ]]; then
        echo "skipped: $skip" >"$log"
        record "$name" "skipped: $skip" 0 "$budget"
        return
    fi
    local left=$((TOTAL_BUDGET - SECONDS - REPORT_BUDGET - KILL_AFTER))
    local limit=$((budget < left ? budget : left))
    local need=$(((budget + 2) / 3))
    if ((limit < need)); then
        ((left < 0)) && left=0
        echo "skipped: ${left} s of the ${TOTAL_BUDGET} s total budget left, this part needs >= ${need} s" >"$log"
        record "$name" "skipped: ${left} s of the total budget left (needs >= ${need} s)" 0 "$budget"
        return
    fi
    local t0 rc status seconds note=${PART_NOTE[$name]:-}
    t0=$(now)
    timeout --signal=TERM --kill-after="$KILL_AFTER" "$limit" bash "$SCRIPT" __part "$name" >"$log" 2>&1 </dev/null
    rc=$?
    seconds=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
    case $rc in
        0) status="ok${note:+ ($note)}" ;;
        124 | 137) status="timed out after $limit s" ;;
        *) status="failed rc=$rc" ;;
    esac
    [[ $rc != 0 ]] && echo "== $status" >>"$log"
    record "$name" "$status" "$seconds" "$limit"
}

fallback_report() {  # results.md from parts.tsv alone, when the Python report could not run
    {
        echo "## GPU check: report incomplete, $(date -u '+%Y-%m-%d %H:%M') UTC"
        echo
        echo "gpu_check_report.py failed (see logs/report.log); the parts as recorded:"
        echo
        echo "| part | status | seconds | limit s |"
        echo "|---|---|---|---|"
        tail -n +2 "$OUT/parts.tsv" | awk -F'\t' '{ printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4 }'
        echo
        echo '```'
        tail -n 30 "$OUT/logs/report.log" 2>/dev/null
        echo '```'
    } >"$OUT/results.md"
}

pack() {  # everything into gpu_check.tar.gz; keep only a few files loose (the device returns 8)
    local entries=() e
    for e in env.json ceilings.json parts.tsv results.md junit-gpu.xml junit-kernels.xml logs bench e2e pretrain; do
        [[ -e $OUT/$e ]] && entries+=("$e")
    done
    if ! tar -czf "$OUT/gpu_check.tar.gz" -C "$OUT" --exclude='pretrain/checkpoints' --exclude='*.safetensors' \
        "${entries[@]}"; then
        echo "packing failed: $OUT left as it is"
        rm -f "$OUT/gpu_check.tar.gz"
        return
    fi
    [[ -f $OUT/bench/speedup.png ]] && cp "$OUT/bench/speedup.png" "$OUT/bench_speedup.png"
    [[ -f $OUT/e2e/speedup.png ]] && cp "$OUT/e2e/speedup.png" "$OUT/e2e_speedup.png"
    rm -rf "${OUT:?}/logs" "${OUT:?}/bench" "${OUT:?}/e2e" "${OUT:?}/pretrain" \
        "${OUT:?}/junit-gpu.xml" "${OUT:?}/junit-kernels.xml"
    echo "packed ${entries[*]} into $OUT/gpu_check.tar.gz ($(du -k "$OUT/gpu_check.tar.gz" | cut -f1) KiB)"
}

main() {
    OUT=${OUT:-./gpu_check_out}
    mkdir -p "$OUT" || exit 1
    OUT=$(cd "$OUT" && pwd)
    export OUT PYTHON
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1  # a killed part's log keeps everything it printed
    cd "$ROOT" || exit 1
    TOTAL_BUDGET=${GPU_CHECK_BUDGET_S:-480}
    if ! [[ $TOTAL_BUDGET =~ ^[0-9]+$ ]]; then
        echo "GPU_CHECK_BUDGET_S must be a whole number of seconds, got '$TOTAL_BUDGET'" >&2
        exit 1
    fi

    # This script's own outputs from an earlier run (only these: $OUT may hold other things).
    rm -rf "${OUT:?}/logs" "${OUT:?}/bench" "${OUT:?}/e2e" "${OUT:?}/pretrain"
    rm -f "$OUT"/{env.json,ceilings.json,parts.tsv,results.md,junit-gpu.xml,junit-kernels.xml}
    rm -f "$OUT"/{gpu_check.tar.gz,bench_speedup.png,e2e_speedup.png}
    mkdir -p "$OUT/logs"
    printf 'part\tstatus\tseconds\tlimit_s\n' >"$OUT/parts.tsv"

    local no_cuda=""
    if [[ ${GPU_CHECK_DRY_RUN:-0} == 1 ]]; then
        no_cuda="no CUDA device (dry run: GPU_CHECK_DRY_RUN=1)"
    else
        local probe
        probe=$(timeout 120 "$PYTHON" -c "import torch; print(torch.cuda.is_available())" 2>&1 | tail -n 1)
        [[ $probe == True ]] || no_cuda="no CUDA device (torch.cuda.is_available(): $probe)"
    fi
    GPU_CHECK_CUDA=1
    [[ -n $no_cuda ]] && GPU_CHECK_CUDA=0
    export GPU_CHECK_CUDA
    export GPU_CHECK_MODE=${no_cuda:-"CUDA device"}
    export GPU_CHECK_BUDGET_S=$TOTAL_BUDGET
    echo "gpu_check: $GPU_CHECK_MODE; budget $TOTAL_BUDGET s; results in $OUT"

    declare -gA PART_NOTE=()
    [[ ${GPU_CHECK_SKIP_BUILD:-0} == 1 ]] && PART_NOTE[build]="no compile: GPU_CHECK_SKIP_BUILD=1"
    local name
    for name in "${PARTS[@]}"; do
        if [[ -n $no_cuda && -n ${NEEDS_CUDA[$name]:-} ]]; then
            run_part "$name" "$no_cuda"
        else
            run_part "$name"
        fi
    done

    local t0 rc seconds
    t0=$(now)
    export GPU_CHECK_SECONDS=$SECONDS
    timeout --signal=TERM --kill-after="$KILL_AFTER" "$REPORT_BUDGET" \
        "$PYTHON" "$REPORT_PY" "$OUT" >"$OUT/logs/report.log" 2>&1 </dev/null
    rc=$?
    seconds=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
    if [[ $rc != 0 || ! -s $OUT/results.md ]]; then
        fallback_report
        record report "failed rc=$rc" "$seconds" "$REPORT_BUDGET"
    else
        record report ok "$seconds" "$REPORT_BUDGET"
    fi

    [[ ${GPU_CHECK_PACK:-1} != 0 ]] && pack
    echo
    cat "$OUT/results.md"
    [[ -s $OUT/results.md ]]
}

if [[ ${1:-} == __part ]]; then
    run_part_body "$2"
else
    main "$@"
fi
