#!/usr/bin/env bash
# The GPU checks the open issues ask for, in one call of at most 8 minutes on one GPU (docs/benchmarks.md,
# "GPU (real dimensions)"), at Qwen2-VL-2B's real dimensions with random weights (no download):
#   1. grouped.py --dims 2b --recipe lora   image-grouped against per-sample training, the exp1 LoRA recipe:
#                                           questions/s, peak memory, projected Kvasir-VQA epoch; 9 and 25 questions
#   2. grouped.py --dims 2b --recipe full   the same for full fine-tuning of the language model, 9 questions
#   3. real_size_run.py --group-by-image    `surgvqa run` end to end with grouped training (LoRA, 100 steps)
# Each writes its JSON under benchmarks/results/; with OUT set, copies are left there too.
#   PYTHON=.venv/bin/python bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")" || exit 1
PYTHON=${PYTHON:-../.venv/bin/python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH=../src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
status=0
# step, then its time limit in seconds: the three together stay under 8 minutes with the model builds
for entry in "grouped.py --dims 2b --recipe lora --questions 9 25 --runs 2 --images 2|170" \
             "grouped.py --dims 2b --recipe full --questions 9 --runs 2 --images 2|110" \
             "real_size_run.py --recipe lora --steps 100 --images 120 --group-by-image|170"; do
    step=${entry%|*}
    limit=${entry##*|}
    echo "== $step"
    started=$(date +%s)
    # shellcheck disable=SC2086  # the step carries its own arguments
    timeout "$limit" "$PYTHON" $step 2>"${OUT:-/tmp}/${step%%.py*}.stderr" | tail -c 4000 || status=1
    echo "== $step: $(( $(date +%s) - started )) s"
done
[ -n "${OUT:-}" ] && cp results/grouped_training_2b_*.json results/real_size_run_lora_grouped.json "$OUT"/ 2>/dev/null
exit $status
