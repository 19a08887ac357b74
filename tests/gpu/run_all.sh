#!/usr/bin/env bash
# The whole GPU check in one command, from the repository root on a GPU machine:
#   bash tests/gpu/run_all.sh            (carry .whl/ from tests/gpu/fetch_wheels.sh)
# Installs what the image lacks, builds the C++ extension and the CUDA kernels (engine._C_cuda),
# runs tests/gpu, the kernel microbenchmark (benchmarks/kernels.py, JSON in $OUT), the default
# pre-training configuration in bf16 on one GPU over NCCL, then FP8 against bf16 (benchmarks/fp8.py:
# step throughput and the loss after FP8_STEPS steps, JSON in $OUT), then the engine against an HF-style
# trainer on the same triplets (benchmarks/e2e.py: ~1B and 7B-shaped models at 8k packs, triplets/s
# ratio, JSON in $OUT), and prints a short table. A failing step is recorded in the table and the next
# steps still run.
# A lent GPU comes with minutes, not hours: each step has its own time limit (exit 124 in the table
# when it ran out) and the benchmark runs its quick shape set unless told otherwise:
#   KERNELS_ARGS="" bash tests/gpu/run_all.sh      # the full shape set
set -uo pipefail
OUT=${OUT:-/tmp/polar_gpu}; mkdir -p "$OUT"
KERNELS_ARGS=${KERNELS_ARGS---quick}
T_BUILD=${T_BUILD:-240} T_TESTS=${T_TESTS:-180} T_KERNELS=${T_KERNELS:-240} T_DEFAULT=${T_DEFAULT:-180}
# worst case the caps add up to more than one 10-minute device call; the steps usually end well before
T_FP8=${T_FP8:-150} FP8_STEPS=${FP8_STEPS:-200}
# e2e: two shapes, each one engine run and one baseline run (two where flash_attn imports), each run
# capped at E2E_RUN_TIMEOUT so that one stuck run leaves time for the others
T_E2E=${T_E2E:-210} E2E_RUN_TIMEOUT=${E2E_RUN_TIMEOUT:-100} E2E_ARGS=${E2E_ARGS---steps 8 --baseline-steps 3}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PATH=/tmp/site/bin:$PATH  # ninja for torch's builder
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

declare -A RESULT
# setup.py against the image's CUDA torch (no build isolation); forced, so a CUDA build problem is
# an error here. If it fails, build engine._C alone so the default run still has its packer.
t0=$(date +%s)
POLAR_FORCE_CUDA_BUILD=1 timeout "$T_BUILD" python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; RESULT[build]=$?
if [ "${RESULT[build]}" != 0 ]; then
  tail -30 "$OUT/build.log"
  POLAR_SKIP_CUDA_BUILD=1 python3 setup.py -q build_ext --inplace > "$OUT/build_cpu.log" 2>&1 \
    || tail -20 "$OUT/build_cpu.log"
fi
echo "build wall: $(( $(date +%s) - t0 ))s"

timeout "$T_TESTS" python3 -m pytest tests/gpu -q 2>&1 | tee "$OUT/tests_gpu.log"; RESULT[tests_gpu]=${PIPESTATUS[0]}

timeout "$T_KERNELS" python3 benchmarks/kernels.py $KERNELS_ARGS --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.md"; RESULT[kernels]=${PIPESTATUS[0]}

t0=$(date +%s)
timeout "$T_DEFAULT" torchrun --standalone --nproc_per_node 1 engine/pretrain.py train.precision=bf16 run_dir="$OUT/default_bf16" \
  2>&1 | tee "$OUT/default_bf16.log"; RESULT[default_bf16]=${PIPESTATUS[0]}
echo "default bf16 wall: $(( $(date +%s) - t0 ))s"

timeout "$T_FP8" python3 benchmarks/fp8.py --steps "$FP8_STEPS" --timeout 120 --json "$OUT/fp8.json" 2>&1 | tee "$OUT/fp8.md"; RESULT[fp8]=${PIPESTATUS[0]}

timeout "$T_E2E" python3 benchmarks/e2e.py $E2E_ARGS --timeout "$E2E_RUN_TIMEOUT" --json "$OUT/e2e.json" 2>&1 \
  | tee "$OUT/e2e.md"; RESULT[e2e]=${PIPESTATUS[0]}

echo; echo "| check | exit | detail |"; echo "|---|---|---|"
echo "| build engine._C + engine._C_cuda | ${RESULT[build]} | $(ls engine/_C_cuda*.so 2>/dev/null || echo 'no engine._C_cuda') |"
echo "| tests/gpu | ${RESULT[tests_gpu]} | $(tail -1 "$OUT/tests_gpu.log") |"
echo "| benchmarks/kernels.py | ${RESULT[kernels]} | $(grep -c '^| .* fwd+bwd' "$OUT/kernels.md" 2>/dev/null || echo 0) readout/loss rows, $OUT/kernels.json |"
python3 - "$OUT/default_bf16/summary.json" "${RESULT[default_bf16]}" <<'PY'
import json, sys
try:
    s = json.load(open(sys.argv[1]))
    print(f"| default bf16 | {sys.argv[2]} | held-out acc {s['held_out_pair_accuracy']:.3f}, "
          f"seen {s['train_pair_accuracy']:.3f}, {s['tokens_per_second']:,.0f} tok/s, {s['steps']} steps |")
except Exception as e:
    print(f"| default bf16 | {sys.argv[2]} | no summary: {e} |")
PY
echo "| benchmarks/fp8.py | ${RESULT[fp8]} | $(grep -c '^| .*fp8' "$OUT/fp8.md" 2>/dev/null || echo 0) FP8 rows, $OUT/fp8.json |"
echo "| benchmarks/e2e.py | ${RESULT[e2e]} | triplets/s engine/HF: $(grep '^| .* | HF .*x |$' "$OUT/e2e.md" 2>/dev/null \
  | awk -F'|' '{printf "%s ", $4}')(per shape and baseline), $OUT/e2e.json |"
echo; grep -E '^(\||[A-Z].*TFLOP/s)' "$OUT/kernels.md" 2>/dev/null || echo "(no kernel benchmark table)"
echo; grep -E '^(\||[A-Z].*steps; settings)' "$OUT/fp8.md" 2>/dev/null || echo "(no FP8 benchmark table)"
echo; grep -E '^(\||[A-Z].*timed steps|engine / baseline)' "$OUT/e2e.md" 2>/dev/null || echo "(no e2e benchmark table)"
