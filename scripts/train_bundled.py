#!/usr/bin/env python
"""Train jattn's bundled model (see configs/bundled_model.py for the recipe and results).

  python scripts/train_bundled.py all --max-minutes 150     # A, B, C, then export
                                      # (stopped during C: exports the EMA so far, "partial")
  python scripts/train_bundled.py vae|cache|unet            # one stage
  python scripts/train_bundled.py export [--partial] [--out DIR] [--force]
  python scripts/train_bundled.py status                    # where each stage stands

Every stage resumes from its newest checkpoint and skips when done, so the same command
can simply be run again after a stop (``--max-minutes``, SIGTERM, a crash).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _status(cfg) -> None:
    from jattn.train.checkpointing import StageCheckpoints
    from jattn.train.stages import stage_dirs

    d = stage_dirs(cfg)
    final = d["vae"] / "final"
    if (final / "eval.json").is_file():
        ev = json.loads((final / "eval.json").read_text())
        print(f"vae:    done, PSNR {ev['psnr_mean_db']:.2f} dB (min {ev['psnr_min_db']:.2f}), "
              f"scaling_factor {ev['scaling_factor']:.5f}")
    else:
        s = StageCheckpoints(d["vae"] / "ckpt").latest_step() if (d["vae"] / "ckpt").is_dir() else None
        print(f"vae:    step {s or 0}/{cfg.vae.steps}")
    if (d["cache"] / "meta.json").is_file():
        print(f"cache:  done, {json.loads((d['cache'] / 'meta.json').read_text())['num_samples']} samples")
    else:
        n = len(list((d["cache"] / "chunks").glob("?????.npz"))) if (d["cache"] / "chunks").is_dir() else 0
        print(f"cache:  {n} chunks of {cfg.cache.chunk}")
    for name, st in cfg.diffusion_phases:
        ck = d[name] / "ckpt"
        s = StageCheckpoints(ck).latest_step() if ck.is_dir() else None
        print(f"unet:   {name} step {s or 0}/{st.steps} ({st.prediction_type})")
        m = d[name] / "metrics.jsonl"
        if m.is_file() and m.read_text().strip():
            print("        last metrics:", m.read_text().strip().splitlines()[-1])
    rec = d["export_record"]
    print("export:", rec.read_text().strip() if rec.is_file() else "not yet")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["all", "vae", "cache", "unet", "export", "status"])
    ap.add_argument("--config", default=str(ROOT / "configs" / "bundled_model.py"),
                    help="config file[:arg] (default: configs/bundled_model.py)")
    ap.add_argument("--workdir", default=None, help="override the config's workdir")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop cleanly (with a checkpoint) after this many minutes of running "
                         "time (time spent stopped by SIGSTOP is not counted)")
    ap.add_argument("--out", default=None, help="export folder (default: the config's)")
    ap.add_argument("--partial", action="store_true", help="export an unfinished stage C")
    ap.add_argument("--force", action="store_true", help="export even if up to date")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = ap.parse_args(argv)

    os.chdir(ROOT)  # relative workdir / export_dir are relative to the repository
    from jattn.train import stages
    from jattn.train.config import load_config
    from jattn.train.loop import StopFlag

    cfg = load_config(args.config)
    if args.workdir:
        cfg = cfg.replace(workdir=args.workdir)
    if args.command == "status":
        _status(cfg)
        return 0
    Path(cfg.workdir).mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    t0 = time.time()
    with StopFlag(60 * args.max_minutes if args.max_minutes else None) as stop:
        todo = {"all": ["vae", "cache", "unet", "export"]}.get(args.command, [args.command])
        for stage in todo:
            if stage == "vae":
                done = stages.train_vae(cfg, stop, progress)
            elif stage == "cache":
                done = stages.build_cache(cfg, stop, progress)
            elif stage == "unet":
                done = stages.train_diffusion(cfg, stop, progress)
            else:
                stages.export(cfg, args.out, force=args.force, allow_unfinished=args.partial)
                done = True
            if not done:
                print(f"[train_bundled] stopped during stage {stage} after "
                      f"{(time.time() - t0) / 60:.1f} min; run the same command again to resume",
                      file=sys.stderr, flush=True)
                if stage == "unet" and args.command == "all":
                    # a usable model now (EMA of the newest checkpoint); the finished run
                    # overwrites it
                    stages.export(cfg, args.out, allow_unfinished=True)
                    print("[train_bundled] exported the unfinished model (partial)",
                          file=sys.stderr, flush=True)
                return 3
    print(f"[train_bundled] {args.command}: done in {(time.time() - t0) / 60:.1f} min",
          file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
