#!/usr/bin/env bash
# The whole GPU check in one device call, from the repository root on a GPU machine, with the
# wheels the image lacks carried as .whl/ (tests/gpu/fetch_wheels.sh, run on the development machine):
#   run(command="bash tests/gpu/run_all.sh", timeout_s=590, carry=[".whl"])
# Before that call, here (no GPU, ~1 min):   PATH=$PWD/.venv/bin:$PATH bash tests/gpu/run_all.sh --dry-run
# checks every stage's command line instead of running it: setup.py's build_ext, each benchmark's own
# argparse reading the flags given (tests/gpu/argcheck.py), torchrun's flags and the pre-training
# overrides (--print-config), tests/gpu collected; exit 1 if any stage's check failed.
# A task is lent 15 minutes of device time in all, the machine's start (one to two minutes) and
# its idle waits included, so one call is bounded by BUDGET_S (default 540 s): the stages' expected
# times (build ~10 s, e2e ~190, fp8 ~200, cuda ~70, tests ~100) just about fill it, and what it did not
# reach can be rerun while the machine is still warm (it goes back after 30 s idle; built files and
# $WORK stay until then; a rerun on a fresh machine, one without $WORK/build.log, builds first).
# First the environment: python, torch and its CUDA device, carried megatron-core, transformer_engine
# and flash_attn (absent: fp8's TE variants and e2e's flash-attention baseline are not run), a row of
# the table. Where torch sees no CUDA device (a driver older than the image's CUDA, say) or does not
# import, no stage is run (the benchmarks would time their CPU versions): each is a row 'skipped' saying
# so (REQUIRE_CUDA=0 runs them anyway).
# Stages, in this order, the open issue's acceptance figures first:
#   build    setup.py: engine._C alone (the packer, seconds), which every later stage needs
#   e2e      benchmarks/e2e.py: the engine against an HF-style trainer on the same triplets (the ~1B
#            shape at 8k packs: triplets/s ratio, MFU; the 7B-shaped one in a rerun, E2E_ARGS below),
#            JSON in $WORK; each run may take 3/5 of the stage, so the engine's run ends even where its
#            start is slow and the baselines get what is left
#   fp8      benchmarks/fp8.py: FP8 against bf16, step throughput and the loss after FP8_STEPS steps;
#            each variant may take half the stage, so bf16 and the first FP8 variant both end even
#            where a start is slow
#   cuda     setup.py against the image's CUDA torch, forced: the CUDA kernels (engine._C_cuda), which
#            e2e and fp8 do not use (Triton and torch kernels) and tests and kernels do
#   tests    pytest tests/gpu (Triton and CUDA kernels against torch references and the contrastive
#            losses' fp64 oracles, bf16 resume in each optimizer format, a background checkpoint save
#            against a synchronous one, polar score with and without its preparing thread and its
#            pinned batches), TEST_WORKERS
#            processes given one test at a time (--dist loadgroup; there the tests that train or
#            score in subprocesses go first: tests/gpu/conftest.py), each result a line as it ends,
#            so a run cut at its limit still counts what passed and names what failed; the figures
#            they report ($WORK/tests_measured.md, e.g. InfoNCE's worst error in ulp), the failed and
#            the skipped tests (with the reason) are listed under the table
#   kernels  benchmarks/kernels.py (quick shape set unless KERNELS_ARGS=""), JSON in $WORK; then
#            benchmarks/swiglu_memory.py and benchmarks/optimizer_step.py --device cuda in what is left
#   serve    benchmarks/serve_prefix.py: n rollouts scored with shared prefixes against each alone,
#            through the server's scorer (Triton attention, bf16), a ~0.38B random model
#   score    benchmarks/score_overlap.py --device cuda (~90 s: a random ~0.1B model made and saved,
#            Triton's compiles in a warm-up loop, then 4 x SCORE_REPEATS loops of 1,200 lines):
#            polar score's chunk loop with the next chunk prepared during the forward (f5f7ef6) and
#            its batches in pinned host memory, each against neither, rows compared byte for byte
#   default  the default pre-training configuration in bf16 on one GPU over NCCL
#   reward   benchmarks/reward_async.py --device cuda: verl's reward loop over the in-process scorer, every
#            response in flight batched (score_async) against a pool thread per response, serve's model shape
#   bash tests/gpu/run_all.sh kernels default      some stages only (a rerun)
# What comes back: the device returns at most 8 files from $OUT, so everything (logs, JSON, tables,
# the default run's summary; no checkpoints) goes into $OUT/polar_gpu.tgz, beside $OUT/table.md.
# Carried wheels (WHEELS_DIR, default .whl) are installed only where the image lacks that package
# (its own builds match its torch), megatron-core always; of each, the newest version whose tags this
# python takes (fetch_wheels.sh brings them for more than one python); a package the image lacks with
# no wheel for this python, or a failed install, is a row of the table, not the end of the call. Each
# stage's temporary files (the benchmarks' run directories and checkpoints, gigabytes) go under
# $WORK/scratch/<stage>, removed after the stage, also when the stage was cut at its limit (its Python
# then leaves them behind).
# Each stage runs under the smaller of its own cap (T_<STAGE>) and the budget left; a stage with
# under MIN_STAGE_S left is not started. Exit 124 in the table: cut at its limit (what it left running
# is killed 10 s later). The table ends with the command that reruns the stages not run. A failing
# stage does not stop the next ones.
set -uo pipefail
DRY_RUN=0
if [ "${1:-}" = --dry-run ]; then DRY_RUN=1; shift; fi
WORK=${WORK:-/tmp/polar_gpu}; mkdir -p "$WORK"  # every stage's files; a rerun adds to them
ORDER=(build e2e fp8 cuda tests kernels serve score default reward)
STAGES=("$@"); [ ${#STAGES[@]} -gt 0 ] || STAGES=("${ORDER[@]}")
BUDGET_S=${BUDGET_S:-540} MIN_STAGE_S=${MIN_STAGE_S:-30} RESERVE_S=${RESERVE_S:-15}
T_BUILD=${T_BUILD:-60} T_E2E=${T_E2E:-190} T_FP8=${T_FP8:-240} T_CUDA=${T_CUDA:-150} T_TESTS=${T_TESTS:-120}
T_KERNELS=${T_KERNELS:-230} T_SERVE=${T_SERVE:-90} T_SCORE=${T_SCORE:-150} T_DEFAULT=${T_DEFAULT:-120}
T_REWARD=${T_REWARD:-90}
FP8_STEPS=${FP8_STEPS:-200} KERNELS_ARGS=${KERNELS_ARGS---quick} TEST_WORKERS=${TEST_WORKERS:-6}
# e2e: the ~1B shape (issue 10's MFU and ratio), one engine run and one baseline run (two where flash_attn
# imports); the 7B-shaped one in a rerun: E2E_ARGS="--steps 8 --baseline-steps 3 --shapes 2" ... e2e
E2E_ARGS=${E2E_ARGS---steps 8 --baseline-steps 3 --shapes 1}
SERVE_ARGS=${SERVE_ARGS---layers 8 --hidden 2048 --heads 16 --kv-heads 8 --ffn 5632 --groups 8 --n 8}
SCORE_REPEATS=${SCORE_REPEATS:-3} REQUIRE_CUDA=${REQUIRE_CUDA:-1}
REWARD_ARGS=${REWARD_ARGS---layers 8 --hidden 2048 --heads 16 --kv-heads 8 --ffn 5632 --prompt 512 --reference 512 \
--rollout 512 --responses 512}
# bash's arithmetic reads a word as a variable's name and 08 as bad octal: REQUIRE_CUDA=no or BUDGET_S=300s
# ended the script under set -u before its table, the device call spent on one line of error
for v in BUDGET_S MIN_STAGE_S RESERVE_S T_BUILD T_E2E T_FP8 T_CUDA T_TESTS T_KERNELS T_SERVE T_SCORE T_DEFAULT \
         T_REWARD FP8_STEPS TEST_WORKERS SCORE_REPEATS REQUIRE_CUDA; do
  [[ "${!v}" =~ ^(0|[1-9][0-9]*)$ ]] || { echo "$v=${!v}: a whole number is expected (REQUIRE_CUDA: 0 or 1)"; exit 2; }
done
for s in "${STAGES[@]}"; do
  [[ " ${ORDER[*]} " == *" $s "* ]] || { echo "unknown stage: $s (${ORDER[*]})"; exit 2; }
done
wants() { [[ " ${STAGES[*]} " == *" $1 "* ]]; }
# a machine that has not built here (a fresh one: a rerun after the warm one went back) builds first:
# every other stage needs engine._C, the tests and kernels engine._C_cuda
if [ "${AUTO_BUILD:-1}" = 1 ]; then
  if ! wants build && [ ! -e "$WORK/build.log" ]; then
    echo "no build on this machine yet ($WORK/build.log): the build stage runs first"; STAGES+=(build)
  fi
  if ! wants cuda && [ ! -e "$WORK/cuda_build.log" ] && { wants tests || wants kernels; }; then
    echo "no CUDA build on this machine yet ($WORK/cuda_build.log): the cuda stage runs before tests"; STAGES+=(cuda)
  fi
fi
# a timeout without -k (busybox's, in some versions) refused every stage's command (exit 125): there a
# stage cut at its limit gets SIGTERM alone
if ! timeout -k 1 10 true 2>/dev/null; then
  echo "timeout here takes no -k: what a stage cut at its limit leaves running is not killed"
  timeout() { [ "$1" = -k ] && shift 2; command timeout "$@"; }
fi
if [ "$DRY_RUN" = 1 ]; then
  # each stage's command line checked, not run: `timeout LIMIT python3 ...` reaches these functions
  timeout() { [ "$1" = -k ] && shift 2; shift; "$@"; }
  python3() {
    local args
    case "${1:-}" in
      setup.py) (unset POLAR_FORCE_CUDA_BUILD; command timeout 120 python3 setup.py build_ext --help > /dev/null) ;;
      benchmarks/*.py) command timeout 120 python3 tests/gpu/argcheck.py "$@" ;;
      -m)
        case "$2" in
          pytest)  # collected in this process: the worker flags read, no workers started
            args=("$@"); [[ " $* " == *" -n "* ]] && args+=(-n 0)
            POLAR_GPU_REQUIRED= command timeout 300 python3 "${args[@]}" --collect-only -qq | tail -3 ;;
          torch.distributed.run)  # torchrun's flags, then the script's settings as the script reads them
            command timeout 120 python3 tests/gpu/argcheck.py "$@" || return
            shift 2; while [ $# -gt 0 ] && [[ "$1" != *.py ]]; do shift; done
            command timeout 120 python3 "$1" --print-config "${@:2}" > /dev/null ;;
          pip) command python3 "$@" --dry-run ;;
          *) command python3 "$@" ;;
        esac ;;
      *) command python3 "$@" ;;
    esac
  }
  nvidia-smi() { echo "dry run: no GPU queried"; }
  REQUIRE_CUDA=0
fi
START=$(date +%s)
WHEELS_DIR=${WHEELS_DIR:-.whl} SITE=${SITE:-/tmp/site} INSTALL=""
if ls "$WHEELS_DIR"/*.whl >/dev/null 2>&1; then
  # one line per wheel to install; '!' and a message for a package the image lacks and no wheel fits
  CHOICE=$(python3 - "$WHEELS_DIR"/*.whl <<'PY'
import os
import sys
from importlib.metadata import PackageNotFoundError, version

try:
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename
except ImportError:  # pip's own copy, where the python has pip but not packaging
    from pip._vendor.packaging.tags import sys_tags
    from pip._vendor.packaging.utils import parse_wheel_filename

rank = {tag: i for i, tag in enumerate(sys_tags())}  # this python's tags, the best first
best, unfit = {}, {}
for path in sys.argv[1:]:
    try:
        name, ver, _, tags = parse_wheel_filename(os.path.basename(path))
    except ValueError as e:  # InvalidWheelFilename (a renamed copy, say): the others are still chosen
        print(f"!{os.path.basename(path)}: not a wheel's file name ({e})")
        continue
    fit = min((rank[t] for t in tags if t in rank), default=None)
    if fit is None:
        unfit.setdefault(name, []).append(os.path.basename(path))
    elif name not in best or (ver, -fit) > best[name][:2]:
        best[name] = (ver, -fit, path)
for name in sorted(set(best) | set(unfit)):
    try:
        # the image's own build (e.g. setuptools, ninja, pybind11) is kept; its megatron-core only where
        # no carried one fits
        if name != "megatron-core" or name not in best:
            print(f"kept the image's {name} {version(name)}", file=sys.stderr)
            continue
    except PackageNotFoundError:
        pass
    if name in best:
        print(best[name][2])
    else:
        print(f"!{name}: no carried wheel for this python ({next(iter(sys_tags()))}): {', '.join(unfit[name])}")
PY
  ) || INSTALL="failed: the wheel choice (python3 and its packaging.tags)"
  UNFIT=$(sed -n 's/^!//p' <<< "$CHOICE"); mapfile -t WHEELS < <(grep -v '^!' <<< "$CHOICE" | grep .)
  [ -n "$UNFIT" ] && { echo "$UNFIT"; INSTALL="failed: ${UNFIT//$'\n'/; }"; }
  if [ ${#WHEELS[@]} -gt 0 ]; then
    echo "installing ${WHEELS[*]}"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "${WHEELS[@]}" > "$WORK/install.log" 2>&1 \
      || { INSTALL="failed: $(tail -1 "$WORK/install.log")${INSTALL:+; $INSTALL}"; cat "$WORK/install.log"; }
  fi
  export PYTHONPATH=$SITE:${PYTHONPATH:-} PATH=$SITE/bin:$PATH  # ninja for torch's builder
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$WORK/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee "$WORK/commit.txt"
# the environment, one line ($WORK/env.txt); exit 1 where torch sees no CUDA device, 2 without torch.
# Any other exit (a crash, say, in an optional package's import) decides nothing: the stages run and tell
timeout -k 10 120 python3 tests/gpu/env_check.py > "$WORK/env.txt" 2>&1
ENV_RC=$?; cat "$WORK/env.txt"
NO_CUDA=""
case "$ENV_RC" in 1) NO_CUDA="torch sees no CUDA device" ;; 2) NO_CUDA="torch does not import" ;; esac
if [ -n "$NO_CUDA" ] && [ "$REQUIRE_CUDA" != 0 ]; then NO_CUDA+=" (the env row); REQUIRE_CUDA=0 runs it anyway"
else NO_CUDA=""; fi

stage_build() {
  # engine._C alone: every stage needs it and it builds in seconds; the CUDA kernels are the cuda stage
  POLAR_SKIP_CUDA_BUILD=1 timeout -k 10 "$1" python3 setup.py build_ext --inplace > "$WORK/build.log" 2>&1 \
    || { local rc=$?; tail -30 "$WORK/build.log"; return $rc; }
}
stage_cuda() {
  # forced, so a CUDA build problem is an error here, not a skip
  POLAR_FORCE_CUDA_BUILD=1 timeout -k 10 "$1" python3 setup.py build_ext --inplace > "$WORK/cuda_build.log" 2>&1 \
    || { local rc=$?; tail -30 "$WORK/cuda_build.log"; return $rc; }
}
# several workers: most of the stage is Triton compiling each test's kernel variant, on the CPU, and
# whole runs in subprocesses (one CPU each). loadgroup (no test names a group) hands out one test at a
# time: xdist's default gives each worker six in a row at first, and the run-bound tests, put first
# for it by tests/gpu/conftest.py, would all go to one. -v: a line per result as it ends (a run cut at
# the limit prints no summary); -rfEs: the failures and the skips with their reasons at the end.
# POLAR_GPU_REQUIRED: no CUDA device is an error there, not every test skipped (tests/gpu/conftest.py)
stage_tests() {
  local workers=()  # pytest-xdist is in the image; without it, one process
  if python3 -c 'import xdist.scheduler.loadgroup' 2>/dev/null; then workers=(-n "$TEST_WORKERS" --dist loadgroup)
  elif python3 -c 'import xdist' 2>/dev/null; then workers=(-n "$TEST_WORKERS"); fi
  rm -f "$WORK/tests_measured.md"  # an earlier call's
  POLAR_GPU_REPORT="$WORK/tests_measured.md" POLAR_GPU_REQUIRED=1 timeout -k 10 "$1" \
    python3 -m pytest tests/gpu -v -rfEs "${workers[@]}" 2>&1 | tee "$WORK/tests_gpu.log"
}
stage_fp8() {
  rm -f "$WORK/fp8.json"  # an earlier call's, on a warm machine: never read as this call's
  timeout -k 10 "$1" python3 benchmarks/fp8.py --steps "$FP8_STEPS" --timeout $(($1 / 2 > 0 ? $1 / 2 : 1)) \
    --json "$WORK/fp8.json" 2>&1 | tee "$WORK/fp8.md"
}
stage_e2e() {
  rm -f "$WORK/e2e.json"
  timeout -k 10 "$1" python3 benchmarks/e2e.py $E2E_ARGS --timeout $(($1 * 3 / 5 > 0 ? $1 * 3 / 5 : 1)) \
    --json "$WORK/e2e.json" 2>&1 | tee "$WORK/e2e.md"
}
stage_kernels() {
  # kernels.py first (issue figures), with what it had before the two others joined the stage (150 s); the
  # fused SwiGLU's memory and the optimizer step's kernels share the last 80 s (each ~30-60 s with its
  # compiles, unmeasured)
  rm -f "$WORK/kernels.json" "$WORK/swiglu_memory.json"
  local t0=$(date +%s) first=$(( $1 > 110 ? $1 - 80 : $1 ))
  timeout -k 10 "$first" python3 benchmarks/kernels.py $KERNELS_ARGS --json "$WORK/kernels.json" 2>&1 \
    | tee "$WORK/kernels.md"
  local rc=${PIPESTATUS[0]} left=$(($1 - ($(date +%s) - t0)))
  (( left > 20 )) && timeout -k 10 $((left / 2)) python3 benchmarks/swiglu_memory.py \
    --json "$WORK/swiglu_memory.json" 2>&1 | tee "$WORK/swiglu_memory.md"
  left=$(($1 - ($(date +%s) - t0)))
  (( left > 10 )) && timeout -k 10 "$left" python3 benchmarks/optimizer_step.py --device cuda 2>&1 \
    | tee "$WORK/optimizer_step.md"
  return "$rc"
}
stage_serve() {
  timeout -k 10 "$1" python3 benchmarks/serve_prefix.py $SERVE_ARGS 2>&1 | tee "$WORK/serve_prefix.md"
}
stage_reward() {
  rm -f "$WORK/reward_async.json"
  timeout -k 10 "$1" python3 benchmarks/reward_async.py --device cuda $REWARD_ARGS --json "$WORK/reward_async.json" \
    2>&1 | tee "$WORK/reward_async.md"
}
stage_score() {
  timeout -k 10 "$1" python3 benchmarks/score_overlap.py --device cuda --repeats "$SCORE_REPEATS" 2>&1 \
    | tee "$WORK/score_overlap.md"
}
stage_default() {
  # one micro-batch per step: at 512-token packs the default model is too small to fill the GPU,
  # and sixteen launches per step would time the launches. The run's own time limit stops training
  # early enough to leave its evaluation and summary inside the stage's limit.
  local train_limit=$(($1 * 3 / 4))
  rm -rf "$WORK/default_bf16"  # a rerun: a new run, not a resume of the last call's finished one
  # the module, not the torchrun script: a torch installed from a carried wheel (pip --target) puts
  # its scripts in $SITE/bin, which is not on PATH
  timeout -k 10 "$1" python3 -m torch.distributed.run --standalone --nproc_per_node 1 engine/pretrain.py \
    train.precision=bf16 train.micro_batch=16 train.time_limit_s=$train_limit run_dir="$WORK/default_bf16" 2>&1 \
    | tee "$WORK/default_bf16.log"
}

# what a stage left running in a session of its own: torchrun starts its workers so (start_new_session), and
# a cut stage's kill reaches torchrun but not a worker still saving its checkpoint, which then held the GPU
# through the next stage's timings (and, on the device, past the call). Found by the stage's mark, which
# every process the stage started inherits in its environment.
reap() {
  local pids
  pids=$(grep -lzx "POLAR_GPU_STAGE=$1" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 | grep -vx "$$")
  [ -n "$pids" ] || return 0
  echo "${1#*:}: killing what the stage left running:" $pids
  kill -9 $pids 2>/dev/null
}
declare -A RESULT WALL
NOT_RUN=()
for s in "${ORDER[@]}"; do
  wants "$s" || continue
  if [ -n "$NO_CUDA" ]; then RESULT[$s]="skipped"; continue; fi
  cap_var=T_${s^^}; left=$((BUDGET_S - ($(date +%s) - START) - RESERVE_S))
  limit=$(( ${!cap_var} < left ? ${!cap_var} : left ))
  if (( limit < MIN_STAGE_S )); then RESULT[$s]="not run"; NOT_RUN+=("$s"); continue; fi
  echo "=== $s (limit ${limit}s, ${left}s of the budget left)"
  mkdir -p "$WORK/scratch/$s"
  t0=$(date +%s); POLAR_GPU_STAGE="$$:$s" TMPDIR="$WORK/scratch/$s" "stage_$s" "$limit"; RESULT[$s]=$?
  WALL[$s]=$(( $(date +%s) - t0 )); reap "$$:$s"
  rm -rf "$WORK/scratch/$s"
done

row() {  # stage, detail (left out for a stage not run: its files would be an earlier call's)
  if [ "${RESULT[$1]}" = "not run" ]; then echo "| $1 | not run | - | budget spent before it |"
  elif [ "${RESULT[$1]}" = "skipped" ]; then echo "| $1 | skipped | - | $NO_CUDA |"
  else echo "| $1 | ${RESULT[$1]} | ${WALL[$1]} | $2 |"; fi
}
ran() { wants "$1" && [ "${RESULT[$1]}" != "not run" ] && [ "${RESULT[$1]}" != "skipped" ]; }
count() { local n; n=$(grep -cE "$1" "$2" 2>/dev/null); echo "${n:-0}"; }  # matching lines, 0 without the file
tests_detail() {  # pytest's summary line; for a run cut at its limit, the results it printed by then
  local log=$WORK/tests_gpu.log last
  last=$(tail -1 "$log" 2>/dev/null)
  if [[ "$last" =~ ^=+\ .*\ in\ [0-9.]+s ]]; then echo "$last"; return; fi
  [ "${RESULT[tests]}" = 124 ] && echo -n "cut at its limit: " || echo -n "no summary: "
  echo "$(count ' PASSED ' "$log") passed, $(count ' (FAILED|ERROR) ' "$log") failed, $(count ' SKIPPED ' "$log")" \
    "skipped by then; last line: ${last:0:200}"
}
# polar plan's prediction beside each measured engine run (seconds, CPU only); a dry run checks its flags
plan_files=$(ls "$WORK/e2e.json" "$WORK/fp8.json" 2>/dev/null)
[ "$DRY_RUN" = 1 ] && plan_files="$WORK/e2e.json $WORK/fp8.json"
if [ -n "$plan_files" ]; then
  timeout -k 10 60 python3 benchmarks/plan_measured.py $plan_files --write "$WORK/plan_measured.json" \
    > "$WORK/plan_measured.md" 2>&1 || PLAN_RC=$?
fi
# e2e.py and fp8.py print their tables at the end: one cut at its limit left only its JSON (written
# as each run ends), whose rows are then rendered into its .md, the greps below reading them there
for s in e2e fp8; do
  if ran "$s" && ! grep -q '^| ' "$WORK/$s.md" 2>/dev/null && [ -s "$WORK/$s.json" ]; then
    timeout 60 python3 tests/gpu/partial_tables.py "$s" "$WORK/$s.json" >> "$WORK/$s.md" 2>&1
  fi
done
figures() {  # the headline figures of e2e or fp8, from its JSON (tests/gpu/partial_tables.py row)
  timeout 60 python3 tests/gpu/partial_tables.py row "$1" "$WORK/$1.json" 2>&1 | tail -1
}
table() {
echo; echo "| stage | exit | wall s | detail |"; echo "|---|---|---|---|"
echo "| env | $( ((ENV_RC == 0)) && echo ok || echo "$ENV_RC") | - | $(tail -1 "$WORK/env.txt") |"
# the card and driver as nvidia-smi sees them: where torch sees none, whether the machine had one at all
echo "| gpu | - | - | nvidia-smi: $(paste -sd ' ' "$WORK/gpu.txt" | cut -c1-300) |"
[ -n "$INSTALL" ] && echo "| install | $INSTALL | - | $WORK/install.log |"
wants build && row build "$(ls engine/_C.*.so 2>/dev/null || echo 'no engine._C')"
wants e2e && row e2e "$(ran e2e && figures e2e)"  # for a stage not run its JSON would be an earlier call's
wants fp8 && row fp8 "$(ran fp8 && figures fp8)"
wants cuda && row cuda "$(ls engine/_C_cuda*.so 2>/dev/null || echo 'no engine._C_cuda')"
wants tests && row tests "$(tests_detail)"
wants kernels && row kernels "$(count '^\| .* fwd\+bwd' "$WORK/kernels.md") readout/loss rows, $WORK/kernels.json"
wants serve && row serve "$(grep '^tokens computed' "$WORK/serve_prefix.md" 2>/dev/null)"
wants score && row score "$(grep '^overlap on cuda' "$WORK/score_overlap.md" 2>/dev/null || echo 'no ratios')"
wants default && row default "$(python3 - "$WORK/default_bf16/summary.json" <<'PY'
import json, sys
try:
    s = json.load(open(sys.argv[1]))
except Exception as e:
    print(f"no summary: {e}")
    sys.exit()
# each figure where the summary has it: a run stopped by SIGTERM (the stage's limit) skips its evaluation, so
# its summary has no accuracies (the row said 'no summary' then), and without a seen-policy set no seen one
parts = [f"{label} {s[key]:.3f}" for label, key in (("held-out acc", "held_out_pair_accuracy"),
                                                    ("seen", "train_pair_accuracy")) if s.get(key) is not None]
if s.get("train_tokens_per_s") is not None:  # training steps only (the progress windows: no warm-up, evaluations)
    parts.append(f"{s['train_tokens_per_s']:,.0f} tok/s training only")
elif s.get("tokens_per_second") is not None:
    parts.append(f"{s['tokens_per_second']:,.0f} tok/s with warm-up, evaluations and saves")
if s.get("mfu") is not None:
    parts.append(f"MFU {s['mfu']:.1%}")
parts.append(f"{s.get('steps')} steps" + (f", stopped by {s['stopped_by']}" if s.get("stopped_by") else ""))
print(", ".join(parts))
PY
)"
wants reward && row reward "$(grep -E '^\| score_async ' "$WORK/reward_async.md" 2>/dev/null | cut -c1-200 \
  || echo 'no table')"
if ran tests; then
  [ -s "$WORK/tests_measured.md" ] && { echo; echo "measured by tests/gpu:"; sed 's/^/- /' "$WORK/tests_measured.md"; }
  failed=$(grep -oE '(FAILED|ERROR) tests/gpu/[^ ]+' "$WORK/tests_gpu.log" 2>/dev/null | sort -u)
  [ -n "$failed" ] && { echo; echo "failed in tests/gpu:"; echo "$failed" | head -30 | sed 's/^/- /'; }
  skipped=$(grep -E '^SKIPPED \[' "$WORK/tests_gpu.log" 2>/dev/null)
  [ -n "$skipped" ] && { echo; echo "skipped in tests/gpu:"; echo "$skipped" | head -30 | sed 's/^/- /'; }
fi
ran e2e && { echo; grep -E '^(\||[A-Z].*timed steps|engine / baseline)' "$WORK/e2e.md" 2>/dev/null \
  || echo "(no e2e benchmark table)"; }
ran fp8 && { echo; grep -E '^(\||[A-Z].*steps; settings)' "$WORK/fp8.md" 2>/dev/null \
  || echo "(no FP8 benchmark table)"; }
[ -s "$WORK/plan_measured.md" ] && { echo; cat "$WORK/plan_measured.md"; }
ran kernels && { echo; grep -E '^(\||[A-Z].*TFLOP/s|results differ)' "$WORK/kernels.md" 2>/dev/null \
  || echo "(no kernel benchmark table)"; }
ran kernels && { echo; grep -E '^(\||[a-z ]*results differ)' "$WORK/swiglu_memory.md" 2>/dev/null \
  || echo "(no swiglu_memory table)"; }
ran kernels && { echo; grep -E '^(\||[a-z ]*results differ)' "$WORK/optimizer_step.md" 2>/dev/null \
  || echo "(no optimizer_step table)"; }
ran serve && { echo; grep -E '^(\||model:|items:)' "$WORK/serve_prefix.md" 2>/dev/null \
  || echo "(no serve_prefix table)"; }
ran score && { echo; grep -E '^(\||model:|input:|## |[0-9]\. )' "$WORK/score_overlap.md" 2>/dev/null \
  || echo "(no score_overlap table)"; }
ran reward && { echo; grep -E '^(\||model:|responses:|score_async:)' "$WORK/reward_async.md" 2>/dev/null \
  || echo "(no reward_async table)"; }
echo; echo "budget: $(( $(date +%s) - START ))s of ${BUDGET_S}s used"
if [ ${#NOT_RUN[@]} -gt 0 ]; then
  echo "not run for lack of budget; while the machine is warm:" \
    "BUDGET_S=<seconds left> bash tests/gpu/run_all.sh ${NOT_RUN[*]}"
fi
}
if [ "$DRY_RUN" = 1 ]; then  # each stage's exit is its command line's check; the figures are none
  bad=(); for s in "${ORDER[@]}"; do wants "$s" && [ "${RESULT[$s]}" != 0 ] && bad+=("$s:${RESULT[$s]}"); done
  [ -n "${PLAN_RC:-}" ] && { bad+=("plan_measured:$PLAN_RC"); cat "$WORK/plan_measured.md"; }
  echo; echo "| stage | check | wall s |"; echo "|---|---|---|"
  for s in "${ORDER[@]}"; do wants "$s" && echo "| $s | ${RESULT[$s]} | ${WALL[$s]:--} |"; done
  echo "| env | $(tail -1 "$WORK/env.txt") | - |"
  [ -n "$INSTALL" ] && echo "| install | $INSTALL | - |"
  if [ ${#bad[@]} -gt 0 ]; then echo "dry run: command lines refused: ${bad[*]}"; exit 1; fi
  echo "dry run: every stage's command line was accepted (nothing was run)"; exit 0
fi
table | tee "$WORK/table.md"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT" && cp "$WORK/table.md" "$OUT/" \
    && tar czf "$OUT/polar_gpu.tgz" --exclude=checkpoints --exclude=./scratch -C "$WORK" . \
    && echo "files: $OUT/table.md, $OUT/polar_gpu.tgz"
fi
exit 0
