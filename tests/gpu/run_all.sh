#!/usr/bin/env bash
# The whole GPU check, from the repository root on a GPU machine (carry .whl/ from
# tests/gpu/fetch_wheels.sh):
#   bash tests/gpu/run_all.sh                       every stage, in this order:
#     build    setup.py against the image's CUDA torch: engine._C and the CUDA kernels (engine._C_cuda)
#     tests    pytest tests/gpu
#     kernels  benchmarks/kernels.py (quick shape set unless KERNELS_ARGS=""), JSON in $OUT
#     default  the default pre-training configuration in bf16 on one GPU over NCCL
#     fp8      benchmarks/fp8.py: FP8 against bf16, step throughput and the loss after FP8_STEPS steps
#     e2e      benchmarks/e2e.py: the engine against an HF-style trainer on the same triplets (~1B and
#              7B-shaped models at 8k packs: triplets/s ratio, MFU), JSON in $OUT
#   bash tests/gpu/run_all.sh build tests kernels   some stages (a device call lasts at most 10 minutes:
#   bash tests/gpu/run_all.sh default fp8 e2e       the two halves fit one call each; built files stay)
# Each stage has its own time limit (exit 124 in the table when it ran out); a failing stage is
# recorded in the table and the next ones still run. A short table of the stages run ends the output.
set -uo pipefail
OUT=${OUT:-/tmp/polar_gpu}; mkdir -p "$OUT"
STAGES=("$@"); [ ${#STAGES[@]} -gt 0 ] || STAGES=(build tests kernels default fp8 e2e)
KERNELS_ARGS=${KERNELS_ARGS---quick}
T_BUILD=${T_BUILD:-240} T_TESTS=${T_TESTS:-150} T_KERNELS=${T_KERNELS:-180} T_DEFAULT=${T_DEFAULT:-150}
T_FP8=${T_FP8:-150} FP8_STEPS=${FP8_STEPS:-200}
# e2e: two shapes, each one engine run and one baseline run (two where flash_attn imports), each run
# capped at E2E_RUN_TIMEOUT so that one stuck run leaves time for the others
T_E2E=${T_E2E:-250} E2E_RUN_TIMEOUT=${E2E_RUN_TIMEOUT:-100} E2E_ARGS=${E2E_ARGS---steps 8 --baseline-steps 3}
for s in "${STAGES[@]}"; do
  case $s in build|tests|kernels|default|fp8|e2e) ;; *) echo "unknown stage: $s (build tests kernels default fp8 e2e)"; exit 2 ;; esac
done
wants() { [[ " ${STAGES[*]} " == *" $1 "* ]]; }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PATH=/tmp/site/bin:$PATH  # ninja for torch's builder
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee "$OUT/commit.txt"

declare -A RESULT
if wants build; then
  # forced, so a CUDA build problem is an error here; if it fails, build engine._C alone so the
  # later stages still have the packer
  t0=$(date +%s)
  POLAR_FORCE_CUDA_BUILD=1 timeout "$T_BUILD" python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; RESULT[build]=$?
  if [ "${RESULT[build]}" != 0 ]; then
    tail -30 "$OUT/build.log"
    POLAR_SKIP_CUDA_BUILD=1 python3 setup.py -q build_ext --inplace > "$OUT/build_cpu.log" 2>&1 \
      || tail -20 "$OUT/build_cpu.log"
  fi
  echo "build wall: $(( $(date +%s) - t0 ))s"
fi
if wants tests; then
  timeout "$T_TESTS" python3 -m pytest tests/gpu -q 2>&1 | tee "$OUT/tests_gpu.log"; RESULT[tests]=${PIPESTATUS[0]}
fi
if wants kernels; then
  timeout "$T_KERNELS" python3 benchmarks/kernels.py $KERNELS_ARGS --json "$OUT/kernels.json" 2>&1 \
    | tee "$OUT/kernels.md"; RESULT[kernels]=${PIPESTATUS[0]}
fi
if wants default; then
  t0=$(date +%s)
  timeout "$T_DEFAULT" torchrun --standalone --nproc_per_node 1 engine/pretrain.py train.precision=bf16 \
    run_dir="$OUT/default_bf16" 2>&1 | tee "$OUT/default_bf16.log"; RESULT[default]=${PIPESTATUS[0]}
  echo "default bf16 wall: $(( $(date +%s) - t0 ))s"
fi
if wants fp8; then
  timeout "$T_FP8" python3 benchmarks/fp8.py --steps "$FP8_STEPS" --timeout 120 --json "$OUT/fp8.json" 2>&1 \
    | tee "$OUT/fp8.md"; RESULT[fp8]=${PIPESTATUS[0]}
fi
if wants e2e; then
  timeout "$T_E2E" python3 benchmarks/e2e.py $E2E_ARGS --timeout "$E2E_RUN_TIMEOUT" --json "$OUT/e2e.json" 2>&1 \
    | tee "$OUT/e2e.md"; RESULT[e2e]=${PIPESTATUS[0]}
fi

echo; echo "| check | exit | detail |"; echo "|---|---|---|"
wants build && echo "| build engine._C + engine._C_cuda | ${RESULT[build]} | $(ls engine/_C_cuda*.so 2>/dev/null || echo 'no engine._C_cuda') |"
wants tests && echo "| tests/gpu | ${RESULT[tests]} | $(tail -1 "$OUT/tests_gpu.log") |"
wants kernels && echo "| benchmarks/kernels.py | ${RESULT[kernels]} | $(grep -c '^| .* fwd+bwd' "$OUT/kernels.md" 2>/dev/null || echo 0) readout/loss rows, $OUT/kernels.json |"
wants default && python3 - "$OUT/default_bf16/summary.json" "${RESULT[default]}" <<'PY'
import json, sys
try:
    s = json.load(open(sys.argv[1]))
    mfu = [r["mfu"] for r in s["history"] if "mfu" in r and "eval" not in r][1:]
    mfu_s = f", MFU {sorted(mfu)[len(mfu) // 2]:.1%}" if mfu else ""
    print(f"| default bf16 | {sys.argv[2]} | held-out acc {s['held_out_pair_accuracy']:.3f}, "
          f"seen {s['train_pair_accuracy']:.3f}, {s['tokens_per_second']:,.0f} tok/s{mfu_s}, {s['steps']} steps |")
except Exception as e:
    print(f"| default bf16 | {sys.argv[2]} | no summary: {e} |")
PY
wants fp8 && echo "| benchmarks/fp8.py | ${RESULT[fp8]} | $(grep -c '^| .*fp8' "$OUT/fp8.md" 2>/dev/null || echo 0) FP8 rows, $OUT/fp8.json |"
wants e2e && echo "| benchmarks/e2e.py | ${RESULT[e2e]} | triplets/s engine/HF: $(grep '^| .* | HF .*x |$' "$OUT/e2e.md" 2>/dev/null \
  | awk -F'|' '{printf "%s ", $4}')(per shape and baseline), $OUT/e2e.json |"
wants kernels && { echo; grep -E '^(\||[A-Z].*TFLOP/s)' "$OUT/kernels.md" 2>/dev/null || echo "(no kernel benchmark table)"; }
wants fp8 && { echo; grep -E '^(\||[A-Z].*steps; settings)' "$OUT/fp8.md" 2>/dev/null || echo "(no FP8 benchmark table)"; }
wants e2e && { echo; grep -E '^(\||[A-Z].*timed steps|engine / baseline)' "$OUT/e2e.md" 2>/dev/null || echo "(no e2e benchmark table)"; }
exit 0
