#!/usr/bin/env bash
# Creates one peer's own virtual environment under benchmarks/peers/.venvs/<peer> (ignored by git), never in the
# project's .venv: LLaMA-Factory caps transformers at 5.6.0 and ms-swift pins its own stack.
#   bash benchmarks/peers/setup.sh llamafactory|ms-swift|trl|all
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
TORCH="${TORCH:-torch==2.14.1 torchvision==0.29.1}"
declare -A PACKAGES=(
  [llamafactory]="llamafactory==0.9.5 jieba nltk rouge-chinese"  # the last three: predict_with_generate checks for them
  [ms-swift]="ms-swift==4.6.0 qwen_vl_utils>=0.0.14"  # ms-swift loads Qwen2-VL images through qwen_vl_utils
  # TRL's CLI (`trl sft`) reads a YAML config; it has no image loading of its own, so its dataset stays a
  # `datasets` folder saved with decoded images (written by run.py with this venv's `datasets`).
  [trl]="trl==1.16.0 peft"  # peft: TRL's LoRA (use_peft) needs it and does not depend on it
)
peers=("$@")
[[ ${#peers[@]} -eq 1 && ${peers[0]} == all ]] && peers=(llamafactory ms-swift trl)
[[ ${#peers[@]} -ge 1 ]] || { echo "usage: $0 llamafactory|ms-swift|trl|all" >&2; exit 2; }
for peer in "${peers[@]}"; do
  [[ -n "${PACKAGES[$peer]:-}" ]] || { echo "unknown peer: $peer" >&2; exit 2; }
  venv="$here/.venvs/$peer"
  if [[ -f "$venv/.installed" ]]; then echo "$peer: $venv already set up"; continue; fi
  python3 -m venv "$venv"
  # nice: the machine is shared; the installs compete with nothing that matters less.
  nice -n 19 "$venv/bin/pip" install -q --upgrade pip
  # shellcheck disable=SC2086  # word splitting of the package lists is intended
  nice -n 19 "$venv/bin/pip" install -q $TORCH
  # shellcheck disable=SC2086
  nice -n 19 "$venv/bin/pip" install -q ${PACKAGES[$peer]} pillow pyyaml
  "$venv/bin/pip" freeze > "$venv/freeze.txt"
  touch "$venv/.installed"
  echo "$peer: $venv"
done
