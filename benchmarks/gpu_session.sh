#!/usr/bin/env bash
# The GPU checks in one call, for a lent GPU machine (docs/benchmarks.md, "GPU (real dimensions)"):
#   1. real_dims_logits.py  supervised-only logits against the full-vocabulary loss, Qwen2-VL-2B dimensions;
#   2. memory_estimate.py   `surgvqa doctor`'s memory estimate against torch.cuda.max_memory_allocated;
#   3. real_size_run.py     `surgvqa run` end to end at 2B dimensions (bf16, gradient checkpointing, 300 steps).
# Each writes its JSON under benchmarks/results/; with OUT set, copies are left there too.
#   PYTHON=.venv/bin/python bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-../.venv/bin/python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
status=0
for step in "real_dims_logits.py" "memory_estimate.py --batch 4 --steps 3" "real_size_run.py --recipe full --steps 300" "real_size_run.py --recipe lora --steps 300"; do
    echo "== $step"
    started=$(date +%s)
    # shellcheck disable=SC2086  # the step carries its own arguments
    "$PYTHON" $step 2>"${OUT:-/tmp}/${step%%.py*}.stderr" | tail -c 4000 || status=1
    echo "== $step: $(( $(date +%s) - started )) s"
done
[ -n "${OUT:-}" ] && cp results/real_dims_logits.json results/memory_estimate*.json results/real_size_run_*.json "$OUT"/ 2>/dev/null
exit $status
