#!/usr/bin/env bash
# The GPU side of issue 15 in one run (<= 8 min on one H200, offline): the `gpu` tests, the 8B-shape DoRA benchmark,
# and an end-to-end recipe run of a random ~1B Llama with tokens/s against the bare torch loop. Every result goes
# to one folder.
#
#   bash bench/gpu_check.sh [RESULTS_DIR]            # default outputs/gpu_check; on the GPU machine
#   bash bench/gpu_check.sh --dry-run [RESULTS_DIR]  # CPU smoke run of every stage at tiny sizes (~6 min, 2 cores)
#
# The GPU machine (torch 2.11 + CUDA, transformers, peft, accelerate, triton; no bitsandbytes, no trl, no network)
# gets what it lacks from the wheel folder .whl/ in the checkout, filled on a connected machine with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2 trl==1.16.0
# (~45 MB; add any other package the preflight below reports missing, at its requirements.txt pin, the same way).
# .whl/ is not git-ignored, so a copy of the working tree carries it.
set -u -o pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RESULTS="$(realpath -m "${1:-$REPO/outputs/gpu_check}")"
cd "$REPO"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ $DRY_RUN == 1 && -x /work/main/.venv/bin/python ]]; then PYTHON=/work/main/.venv/bin/python
  elif [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python
  else PYTHON=python3; fi
fi
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
: > "$LOG"
STATUS="$RESULTS/status.txt"
: > "$STATUS"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
START=$SECONDS

say() { echo "[gpu_check $(( SECONDS - START ))s] $*" | tee -a "$LOG"; }

# stage NAME TIMEOUT_S COMMAND...: runs it with its output in RESULTS/NAME.txt, records rc and seconds.
stage() {
  local name=$1 limit=$2; shift 2
  local began=$SECONDS
  say "$name: $* (timeout ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$RESULTS/$name.txt" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$(( SECONDS - began ))" | tee -a "$STATUS" "$LOG"
  tail -n 25 "$RESULTS/$name.txt" >> "$LOG"
  return 0  # later stages still run; status.txt says what failed
}

# 1. What the machine lacks, from .whl/ (pins from requirements.txt; --no-deps: the image has the dependencies).
say "python: $($PYTHON -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())')"
pin() { grep -i "^$1==" requirements.txt | head -n 1; }
missing=()
for module_and_package in bitsandbytes:bitsandbytes trl:trl datasets:datasets fastapi:fastapi uvicorn:uvicorn \
                          httpx:httpx jsonschema:jsonschema matplotlib:matplotlib safetensors:safetensors; do
  module=${module_and_package%%:*} package=${module_and_package##*:}
  $PYTHON -c "import $module" 2>/dev/null || missing+=("$(pin "$package" || echo "$package")")
done
if (( ${#missing[@]} )); then
  if [[ $DRY_RUN == 1 ]]; then
    say "dry run: would install from .whl/: ${missing[*]}"
  else
    say "installing from .whl/: ${missing[*]}"
    $PYTHON -m pip install --no-index --no-deps --find-links "$REPO/.whl" "${missing[@]}" >> "$LOG" 2>&1 \
      || say "pip install failed: fill .whl/ as the header of this script says"
  fi
else
  say "nothing to install"
fi
$PYTHON -m pip freeze > "$RESULTS/pip_freeze.txt" 2>/dev/null
nvidia-smi > "$RESULTS/nvidia_smi.txt" 2>&1 || true

if [[ $DRY_RUN == 1 ]]; then
  # Every stage's code path at tiny sizes on CPU: the gpu tests' code (GPU_TESTS_ON_CPU=1, a quick subset), the
  # suite at 1/64 width, a tiny random model through the same recipe and the same throughput benchmark.
  export GPU_TESTS_ON_CPU=1
  stage gpu_tests 400 $PYTHON -m pytest -m gpu tests/test_gpu.py -q -x -k "fast_dora_matches or 8bit" \
    --junitxml "$RESULTS/gpu_tests.xml"
  stage dora_8b_bench 300 $PYTHON bench/dora_overhead.py --cpu-8b --width-divisor 64 --shapes 1x128 \
    --accumulation 1 2 --checkpointing on --ranks 4 --steps 1 --warmup 0 --write --benchmarks-file "$RESULTS/BENCHMARKS.md"
  MODEL="$RESULTS/random-llama-tiny"
  rm -rf "$MODEL"
  stage make_model 120 $PYTHON bench/make_random_llama.py --size tiny --out "$MODEL"
  E2E_SET=(--set "base_model=\"$MODEL\"" --set max_steps=2 --set eval_limit=8 --set quant_bits=4
           --set bnb_4bit_compute_dtype=\"float32\" --set gradient_checkpointing=false)
  THROUGHPUT_STEPS=(--warmup 0 --steps 1 --baseline-steps 1)
else
  stage gpu_tests 130 $PYTHON -m pytest -m gpu tests/test_gpu.py -q --junitxml "$RESULTS/gpu_tests.xml"
  # The goal's rows come first (nf4-bf16, r=16, checkpointing on); rows not reached in 2.5 min are listed as such.
  stage dora_8b_bench 230 $PYTHON bench/dora_overhead.py --gpu-8b --budget-min 2.5 --write \
    --benchmarks-file "$RESULTS/BENCHMARKS.md"
  MODEL="$REPO/outputs/random-llama-1b"
  [[ -f "$MODEL/config.json" ]] || stage make_model 60 $PYTHON bench/make_random_llama.py --size 1b --device cuda \
    --out "$MODEL"
  E2E_SET=(--set "base_model=\"$MODEL\"" --set eval_limit=64)
  THROUGHPUT_STEPS=(--warmup 1 --steps 4 --baseline-steps 1)
fi
RECIPE=sentiment_random_llama_1b_4bits_r16_dora_cuda
stage e2e_run 120 $PYTHON lora/finetune.py "$RECIPE" "${E2E_SET[@]}" --output-dir "$RESULTS/e2e_adapter" --overwrite
stage e2e_throughput 80 $PYTHON bench/runner_throughput.py --recipe "$RECIPE" "${E2E_SET[@]}" \
  "${THROUGHPUT_STEPS[@]}" --tag "random llama 1b, gpu_check" --write --benchmarks-file "$RESULTS/BENCHMARKS.md"

say "done in $(( SECONDS - START ))s; results in $RESULTS"
cat "$STATUS" | tee -a "$LOG"
! grep -qv " rc=0 " "$STATUS"
