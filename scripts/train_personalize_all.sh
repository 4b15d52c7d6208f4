#!/usr/bin/env bash
# Train the three personalisation variants one after the other (nested, token, ip_adapter),
# each resuming from its own checkpoints under CKPT (default /work/ckpt): run the same line
# again after a stop and it continues where it was. One training process at a time.
# With LOGDIR, each variant's output is appended to LOGDIR/train_<variant>.log.
#   nohup nice -n 10 bash scripts/train_personalize_all.sh /work/ckpt /work/logs \
#       > /work/logs/train_personalize.log 2>&1 &
set -u
CKPT="${1:-/work/ckpt}"
LOGDIR="${2:-}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
for v in nested token ip_adapter; do
  echo "[train_personalize_all] $(date -u +%FT%TZ) $v" >&2
  if [ -n "$LOGDIR" ]; then
    python "$HERE/scripts/train_personalize.py" --variant "$v" --out "$CKPT/personalize_$v" \
      --no-progress >> "$LOGDIR/train_$v.log" 2>&1
  else
    python "$HERE/scripts/train_personalize.py" --variant "$v" --out "$CKPT/personalize_$v" \
      --no-progress
  fi
  rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "[train_personalize_all] $v stopped (exit $rc); run this script again to resume" >&2
    exit "$rc"
  fi
done
echo "[train_personalize_all] $(date -u +%FT%TZ) all three variants finished" >&2
