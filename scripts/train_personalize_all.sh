#!/usr/bin/env bash
# The whole personalisation recipe (configs/personalize_world.py): stage 0 pretrains the
# subject encoder's vision tower (scripts/pretrain_vision.py), then the three variants
# (nested, token, ip_adapter) train side by side on that frozen tower, the same steps each.
# Every stage resumes from its own checkpoints under CKPT (default /work/ckpt): run the same
# line again after a stop and it continues where it was. With LOGDIR, each stage's output
# is appended to LOGDIR/vision_pretrain.log and LOGDIR/train_<variant>.log.
#   setsid nohup nice -n 10 bash scripts/train_personalize_all.sh /work/ckpt /work/logs \
#       > /work/logs/train_personalize.log 2>&1 < /dev/null &
set -u
CKPT="${1:-/work/ckpt}"
LOGDIR="${2:-}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
log() { if [ -n "$LOGDIR" ]; then echo "$LOGDIR/$1.log"; else echo /dev/stderr; fi; }

echo "[train_personalize_all] $(date -u +%FT%TZ) vision tower" >&2
python "$HERE/scripts/pretrain_vision.py" --out "$CKPT/vision_pretrain" --no-progress \
  >> "$(log vision_pretrain)" 2>&1
rc=$?
if [ "$rc" -ne 0 ]; then
  echo "[train_personalize_all] vision tower stopped (exit $rc); run this script again" >&2
  exit "$rc"
fi
pids=()
for v in nested token ip_adapter; do
  echo "[train_personalize_all] $(date -u +%FT%TZ) $v" >&2
  python "$HERE/scripts/train_personalize.py" --variant "$v" --out "$CKPT/personalize_$v" \
    --vision-init "$CKPT/vision_pretrain/vision.safetensors" --no-progress \
    >> "$(log "train_$v")" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do
  wait "$p" || status=$?
done
if [ "$status" -ne 0 ]; then
  echo "[train_personalize_all] a variant stopped (exit $status); run this script again" >&2
  exit "$status"
fi
echo "[train_personalize_all] $(date -u +%FT%TZ) all three variants finished" >&2
