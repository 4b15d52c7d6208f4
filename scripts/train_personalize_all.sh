#!/usr/bin/env bash
# Train the three personalisation variants one after the other (nested, token, ip_adapter),
# each resuming from its own checkpoints under ROOT (default /work/ckpt): re-run the same
# line after a stop and it continues where it was. One training process at a time.
#   nohup nice -n 10 bash scripts/train_personalize_all.sh /work/ckpt > /work/logs/train_personalize.log 2>&1 &
set -u
ROOT="${1:-/work/ckpt}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
for v in nested token ip_adapter; do
  python "$HERE/scripts/train_personalize.py" --variant "$v" --out "$ROOT/personalize_$v" --no-progress
  rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "[train_personalize_all] $v stopped (exit $rc); run this script again to resume" >&2
    exit "$rc"
  fi
done
echo "[train_personalize_all] all three variants finished" >&2
