#!/usr/bin/env python
"""Pretrain the subject encoder's vision tower (CLIP-style, against the bundled text encoder).

  python scripts/pretrain_vision.py --out /work/ckpt/vision_pretrain [--steps N] [--max-minutes M]
  python scripts/pretrain_vision.py --out DIR --eval-only     # the attribute table only

Resumes from the newest checkpoint in ``DIR/ckpt``; writes ``DIR/metrics.jsonl``,
``DIR/config.json``, the tower ``DIR/vision.safetensors`` (transformers'
CLIPVisionModelWithProjection layout; ``PersonalizeConfig.vision_init`` loads it) and
``DIR/attributes.json``: what the features carry about held-out subjects (linear probes and
zero-shot, jattn.train.vision_pretrain.attribute_accuracy), for the pretrained tower beside
a random one and the tower of the shipped Nested Attention weights. Exit 0: finished,
3: stopped early (run again to resume). Recipe: configs/personalize_world.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="work folder: checkpoints, metrics, tower")
    ap.add_argument("--steps", type=int, default=None, help="total steps (default: the recipe's)")
    ap.add_argument("--model", default=None, help="base model folder (default: the bundled model)")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop cleanly after this many minutes of running time")
    ap.add_argument("--eval-only", action="store_true", help="evaluate the newest checkpoint")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = ap.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps {args.steps}: give a positive number of steps")

    import jax

    import jattn
    from jattn.models.clip_vision import init_clip_vision_params
    from jattn.train import vision_pretrain as V
    from jattn.train.checkpointing import StageCheckpoints
    from jattn.train.loop import StopFlag
    from jattn.train.steps import init_state

    sys.path.insert(0, str(ROOT / "configs"))
    from personalize_world import vision_pretrain_config

    cfg = vision_pretrain_config()
    if args.steps is not None:
        cfg = cfg.replace(steps=args.steps)
    out = Path(args.out)
    t0 = time.time()
    pipe = jattn.load(args.model)
    if args.eval_only:
        from jattn.world.pairs import subject_pairs

        phrases, _ = V.subject_phrases(subject_pairs("train"))
        _, tx = V.make_step(cfg, V.text_features(pipe, phrases))
        ck = StageCheckpoints(out / "ckpt")
        state = ck.restore(init_state(V.init_params(cfg, pipe.text_config.hidden_size), tx))
        finished = int(state["step"]) >= cfg.steps
    else:
        with StopFlag(60 * args.max_minutes if args.max_minutes else None) as stop:
            state, finished = V.train(cfg, pipe, out, stop=stop, progress=not args.no_progress)
    params = jax.device_get(state["params"])
    V.export_tower(out / "vision.safetensors", params)
    enc = cfg.encoder_config()
    table = {"pretrained": V.attribute_accuracy(params["image_encoder"], enc, base=pipe,
                                                text_projection=params["text_projection"],
                                                heads=params.get("heads")),
             "random": V.attribute_accuracy(init_clip_vision_params(enc.vision,
                                                                    jax.random.key(0)), enc)}
    try:
        from jattn.methods.personalize import load_weights

        shipped = load_weights(None)
        table["shipped_encoder"] = V.attribute_accuracy(
            shipped.params["image_encoder"], shipped.config)
    except Exception as e:  # noqa: BLE001 - a report line, not a failure
        print(f"[pretrain_vision] shipped encoder not measured: {e}", file=sys.stderr)
    table["step"] = int(state["step"])
    (out / "attributes.json").write_text(json.dumps(table, indent=1))
    print(json.dumps(table, indent=1))
    print(f"[pretrain_vision] step {int(state['step'])}/{cfg.steps} "
          f"({'finished' if finished else 'stopped; run again to resume'}), "
          f"{(time.time() - t0) / 60:.1f} min; tower {out / 'vision.safetensors'}",
          file=sys.stderr, flush=True)
    return 0 if finished else 3


if __name__ == "__main__":
    sys.exit(main())
