#!/usr/bin/env bash
# Every GPU benchmark of the project in one run, for a machine lent for a few minutes: the
# paper dry run, batched pair generation vs the naive loop, the Grounded-SAM labeler vs the
# official flow, and the clip training step vs vocabulary size. Each gets a time limit, so
# one that hangs does not take the others with it; logs and JSON go to $OUT (default gpu-out).
#     bash benchmarks/gpu_suite.sh            # needs CUDA, torch, transformers, diffusers, pydantic
# (label.py's tokenizer: the MiniLM package, or a copy of its files in $MAGICSEG_BERT_TOKENIZER)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}

run() {  # run NAME SECONDS COMMAND...: the log in $OUT/NAME.log, its tail on stdout
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "--- $name: exit $? after $((SECONDS - t0))s"
    grep -v "it/s\]\|Loading weights\|Writing model" "$OUT/$name.log" | tail -n "${TAIL:-22}"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
    "$PY" -c "import torch, transformers, diffusers; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'diffusers', diffusers.__version__)"
    nproc
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
run dryrun "${DRYRUN_S:-160}" "$PY" benchmarks/paper_dryrun.py --device cuda --json "$OUT/dryrun.json"
run generate "${GENERATE_S:-90}" "$PY" benchmarks/generate.py --device cuda --repeats 2 --no-levers
run label "${LABEL_S:-60}" "$PY" benchmarks/label.py --device cuda --images 16 --repeats 1
run train "${TRAIN_S:-40}" "$PY" benchmarks/train.py --device cuda --full --steps 3 --vocab 1203
