#!/usr/bin/env bash
# Zero-code activation: the same unmodified script, stock and with WHISPER_ACCEL=1.
#   bash examples/env_activation.sh [MODEL_DIR AUDIO]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
script="$here/plain_whisper.py"
echo "== stock (WHISPER_ACCEL unset)"
env -u WHISPER_ACCEL python "$script" "$@"
echo "== WHISPER_ACCEL=1"
WHISPER_ACCEL=1 python "$script" "$@"
echo "== whisper-accel run (launcher)"
whisper-accel run -- python "$script" "$@"
