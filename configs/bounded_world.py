"""Bounded Attention on the bundled model (Dahary, Patashnik, Aberman, Cohen-Or, ECCV 2024;
reference omer11a/bounded-attention; jattn/methods/bounded.py).

Command:
  jattn layout --method bounded --prompt "a red circle and a blue circle" \
      --box "red circle=0,0.25,0.5,0.75" --box "blue circle=0.5,0.25,1,0.75" \
      --seed 0 --out-dir out/bounded_world
  (writes 000.png, masks.npy and result.json with the boxes and the final subject masks)
Python:
  from jattn.methods.bounded import bounded_generate
  cfg = get_config(); cfg.pop("expected"); cfg.pop("method")
  out, masks = bounded_generate(jattn.load(), cfg.pop("prompt"), cfg.pop("phrases"),
                                cfg.pop("boxes"), return_masks=True, **cfg)

Expected figure: a red circle in the left box and a blue circle in the right box, each
with its own colour (plain generation of similar subjects may give both circles one
colour, or fuse them: the leakage Bounded Attention removes). Measured figures: see
scripts/eval_layout.py (figures "boxes" and "binding", --methods baseline,layout,bounded).

Reference defaults (run_sd.py for SD): DDIM 50 steps, CFG 7.5; guidance for the first 15
steps, <= 5 gradient steps per step, step size 8 -> 2 linearly, loss 1.5 cross + 0.5 self
on the mid block and the first up block with attention, stop at loss / subjects < 0.2;
masks from the boxes until step 15, then k-means (3 clusters per subject) of the
running-mean self-attention every 5 steps.
"""


def get_config():
    return dict(
        method="bounded",
        prompt="a red circle and a blue circle",
        phrases=["red circle", "blue circle"],
        boxes=[(0.0, 0.25, 0.5, 0.75), (0.5, 0.25, 1.0, 0.75)],
        num_inference_steps=50, guidance_scale=7.5, seed=0,
        init_step_size=8.0, final_step_size=2.0, num_guidance_steps=15,
        num_gd_iterations=5, loss_threshold=0.2, first_refinement_step=15,
        refine_every=5, num_clusters_per_subject=3,
        expected="each circle in its box with its own colour",
    )
