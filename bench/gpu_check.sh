#!/usr/bin/env bash
# One check for a GPU machine, under 13 minutes (its timeouts add up to 12.5): the test suite on CUDA, then
# training and full-ranking
# evaluation at the Office scale of the paper (synthetic: 87,346 users, 25,986 items, 422,799 training
# rows) in fp32 and bf16, k-means on the GPU, the static-shape and compiled training step
# (bench/static_shapes.py), and the full against the sampled softmax at 100k and 1M items.
#
#   bash bench/gpu_check.sh [RESULTS_DIR]          # default: bench/results
#
# The machine needs torch with CUDA and the project's dependencies. Where it has no package index, put
# wheels of what it lacks in .whl/ (they are installed into /tmp/site, nothing else is touched).
# Writes RESULTS_DIR/gpu_tests.log, gpu_office.{json,md}, static_shapes.{json,md}, gpu_scale_losses.{json,md,png}
# and gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-bench/results}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec > >(tee "$RESULTS/gpu_check.log") 2>&1

echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
"$PYTHON" - <<'EOF'
import accelerate, datasets, torch, transformers
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"accelerate {accelerate.__version__}, datasets {datasets.__version__}; cuda available: {torch.cuda.is_available()}")
assert torch.cuda.is_available(), "no CUDA device"
EOF
[ $? -eq 0 ] || exit 1

echo "== tests (the trainer tests run on CUDA here: Accelerate picks the GPU)"
START=$SECONDS
timeout 200 "$PYTHON" -m pytest -q -p no:cacheprovider -rfEs tests 2>&1 | tee "$RESULTS/gpu_tests.log" | tail -25
echo "tests: $((SECONDS - START)) s"

echo "== Office scale, fp32 and bf16, then k-means"
START=$SECONDS
timeout 280 "$PYTHON" bench/scale.py --preset office --device cuda --precisions no bf16 --train_steps 0 \
    --eval_users 0 --kmeans 100000 1000000 --kmeans_init k-means++ batched-k-means++ \
    --output_dir "$RESULTS" --output_name gpu_office | tail -22
echo "office: $((SECONDS - START)) s"

echo "== shapes that repeat: the defaults, static interest sets + padded histories, the compiled step"
START=$SECONDS
timeout 120 "$PYTHON" bench/static_shapes.py --device cuda --steps 50 --output_dir "$RESULTS" | tail -8
echo "static shapes: $((SECONDS - START)) s"

echo "== full against sampled softmax at 100k and 1M items"
START=$SECONDS
timeout 150 "$PYTHON" bench/scale.py --num_items 100000 1000000 --losses full sampled --device cuda --train_steps 5 \
    --warmup_steps 2 --eval_users 10000 --output_dir "$RESULTS" --output_name gpu_scale_losses | tail -10
echo "losses: $((SECONDS - START)) s"
