#!/usr/bin/env bash
# The GPU checks of one short device session, in one go (bench/README.md, "A GPU session"):
#   build the CUDA extension for sm_90 → the GPU kernel and tuning tests → the kernel
#   benches → bench_tune on the GPU.
# Every step has its own time limit, so one that hangs or fails leaves the rest running;
# each step's log goes to $OUT/<step>.log and its tail to stdout, and $OUT/results.tgz
# holds the logs and the results JSON/SVG.
#
# Usage (repo root of a GPU machine): OUT=/tmp/out bash bench/gpu_checks.sh [steps...]
#   steps: env build tests bench_tune bench_kernels (default: all, in this order)
#   MODEL_DIR: config.json + tokenizer of the model to time with random weights (where its
#   weights cannot travel); unset: the default model (its weights must be installed)
#   TUNE_ARGS: extra bench.bench_tune arguments
#
# With the device tool: first, here, put the default model's config and tokenizer (3.4 MB, no
# weights) in the git-ignored .gpu/:
#   mkdir -p .gpu/model && cp ~/.cache/lift_engine/models/SmolLM2-135M-Instruct/{config.json,\
#     tokenizer.json,tokenizer_config.json,chat_template.jinja,generation_config.json} .gpu/model/
# then run `MODEL_DIR=.gpu/model bash bench/gpu_checks.sh` there with carry [".gpu"]: about
# 6 minutes on an H200 (build 35 s, tests 135 s, bench_tune 157 s, kernel benches 31 s).
set -u
OUT=${OUT:-/tmp/lift_gpu_checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
STEPS=${*:-env build tests bench_tune bench_kernels}
START=$SECONDS

step() {  # step NAME LIMIT_S command...
    local name=$1 limit=$2
    shift 2
    local began=$SECONDS
    echo "=== $name: limit ${limit}s, at +$((began - START))s"
    timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name: rc=$rc after $((SECONDS - began))s$([ $rc = 124 ] && echo ' (TIMED OUT)')"
    tail -n "${TAIL:-25}" "$OUT/$name.log"
}

for s in $STEPS; do
    case $s in
    env)
        step env 60 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; nproc; \
            $PY -c 'import torch, triton, transformers, peft; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
\"triton\", triton.__version__, \"transformers\", transformers.__version__, \"peft\", peft.__version__, torch.cuda.get_device_name())'; \
            which nvcc && nvcc --version | tail -2"
        ;;
    build)
        # lift_engine.kernels is kernels/ (setup.py's package_dir); without an install, a link
        step build 150 bash -c "ln -sfn ../kernels lift_engine/kernels && MAX_JOBS=\$(nproc) TORCH_CUDA_ARCH_LIST=9.0 \
            $PY setup.py build_ext --inplace && $PY -c 'from lift_engine.ops import native; print(native.status())'"
        ;;
    tests)
        step tests 150 "$PY" -m pytest -q -n 8 --timeout 120 -p no:cacheprovider -rfEs --tb=short \
            tests/test_kernels_cuda.py tests/test_kernels_triton_lora.py tests/test_kernels_triton_gated_memory.py \
            tests/test_gpu_tuning.py tests/test_dispatch.py
        ;;
    bench_kernels)
        step bench_lora 60 "$PY" -m bench.bench_lora --quick
        step bench_gated_memory 60 "$PY" -m bench.bench_gated_memory --quick
        ;;
    bench_tune)
        model=()
        [ -n "${MODEL_DIR:-}" ] && model=(--model "$MODEL_DIR" --random-weights)
        # shellcheck disable=SC2086
        step bench_tune 200 "$PY" -m bench.bench_tune --device cuda "${model[@]}" \
            --methods hf,hf-bf16,solo-bf16,batched-bf16,prefix-bf16 --out bench/results/bench_tune_gpu.json ${TUNE_ARGS:-}
        ;;
    *) echo "unknown step $s" ;;
    esac
done
tar czf "$OUT/results.tgz" -C . $(ls bench/results/*gpu* bench/results/bench_lora.* bench/results/bench_gated_memory.* 2>/dev/null) \
    -C "$OUT" $(cd "$OUT" && ls *.log) 2>/dev/null
echo "=== done after $((SECONDS - START))s"
