#!/usr/bin/env python
"""Train a personalisation encoder on the world's pairs (recipe: configs/personalize_world.py).

  python scripts/train_personalize.py --variant nested --out /work/ckpt/personalize_nested \
      --vision-init /work/ckpt/vision_pretrain/vision.safetensors
  python scripts/train_personalize.py --variant token --out DIR [--steps N] [--max-minutes M]
  python scripts/train_personalize.py --variant ip_adapter --out DIR --export-only [--validate]

Resumes from the newest checkpoint in ``DIR/ckpt`` (a kill, SIGTERM, --max-minutes or the
end of a session loses at most ``checkpoint_every`` steps; the same command continues).
Writes ``DIR/metrics.jsonl`` (loss curves), ``DIR/config.json`` and, when the run finishes
or stops, the EMA weights to ``--export`` (default ``DIR/weights.safetensors``; layout in
jattn/train/personalize.py, ``nested`` = jattn.models.nested.save_nested_weights). Exit
code 0: finished, 3: stopped before ``--steps`` (run again to resume).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MAX_BYTES = 10 * 2 ** 20


def _load_recipe(spec: str, variant: str):
    path, _, arg = spec.partition(":")
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"--config {path}: no such file (default: configs/personalize_world.py)")
    ms = importlib.util.spec_from_file_location(f"_jattn_recipe_{p.stem}", p)
    mod = importlib.util.module_from_spec(ms)
    ms.loader.exec_module(mod)
    return mod.get_config(arg or variant)


def main(argv=None) -> int:
    from jattn.train.personalize import VARIANTS

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=VARIANTS, default="nested")
    ap.add_argument("--out", required=True, help="work folder: checkpoints, metrics, weights")
    ap.add_argument("--steps", type=int, default=None, help="total steps (default: the recipe's)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "personalize_world.py"),
                    help="recipe file[:arg] (default: configs/personalize_world.py, arg = variant)")
    ap.add_argument("--model", default=None, help="base model folder (default: the bundled model)")
    ap.add_argument("--vision-init", default=None,
                    help="pretrained vision tower (scripts/pretrain_vision.py's "
                         "DIR/vision.safetensors), loaded and kept frozen")
    ap.add_argument("--export", default=None,
                    help="weights file (default: OUT/weights.safetensors)")
    ap.add_argument("--export-only", action="store_true", help="export the newest checkpoint's EMA")
    ap.add_argument("--validate", action="store_true",
                    help="with --export-only: also print the held-out validation loss of the "
                         "EMA (with the subject and with shuffled subjects)")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop cleanly after this many minutes of running time")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = ap.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps {args.steps}: give a positive number of steps")

    import jattn
    from jattn.train import personalize as P
    from jattn.train.checkpointing import StageCheckpoints
    from jattn.train.loop import StopFlag
    from jattn.train.steps import init_state

    cfg = _load_recipe(args.config, args.variant)
    if cfg.variant != args.variant:
        cfg = cfg.replace(variant=args.variant)
    if args.steps is not None:
        cfg = cfg.replace(steps=args.steps)
    if args.vision_init is not None:
        if not Path(args.vision_init).is_file():
            ap.error(f"--vision-init {args.vision_init}: no such file; make it with "
                     "scripts/pretrain_vision.py --out DIR (DIR/vision.safetensors)")
        cfg = cfg.replace(vision_init=str(Path(args.vision_init).resolve()))
    out = Path(args.out)
    export = Path(args.export) if args.export else out / "weights.safetensors"
    t0 = time.time()
    base = P.base_from_pipeline(jattn.load(args.model))
    print(f"[train_personalize] {cfg.variant}: batch {cfg.batch_size}, {cfg.steps} steps, "
          f"lr {cfg.lr}, out {out}", file=sys.stderr, flush=True)
    if args.export_only:
        _, tx = P.make_step(cfg, base)
        ck = StageCheckpoints(out / "ckpt")
        state = ck.restore(init_state(P.init_params(cfg, base), tx))
        finished = int(state["step"]) >= cfg.steps
        if args.validate:
            import json

            v = P.validation_loss(cfg, base, state["ema"])
            print(json.dumps({"step": int(state["step"]), **v}), flush=True)
    else:
        with StopFlag(60 * args.max_minutes if args.max_minutes else None) as stop:
            state, finished = P.train(cfg, base, out, stop=stop, progress=not args.no_progress)
    path = P.export_weights(export, cfg, base, state["ema"])
    size = os.path.getsize(path)
    step = int(state["step"])
    print(f"[train_personalize] {cfg.variant}: step {step}/{cfg.steps} "
          f"({'finished' if finished else 'stopped; run again to resume'}), "
          f"{(time.time() - t0) / 60:.1f} min; EMA weights {path} ({size / 2 ** 20:.2f} MiB)",
          file=sys.stderr, flush=True)
    if size > MAX_BYTES:
        print(f"[train_personalize] warning: {path} is over 10 MiB", file=sys.stderr)
    return 0 if finished else 3


if __name__ == "__main__":
    sys.exit(main())
