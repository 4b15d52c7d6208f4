"""ConsiStory on the bundled model (Tewel et al. SIGGRAPH 2024; reference NVlabs/consistory;
jattn/methods/consistory.py).

Command:
  jattn consistory --subject heart \
      --prompt "a heart on the left on a beige background" \
      --prompt "a heart at the top on a gray background" \
      --prompt "a heart on the right on a checkered background" \
      --prompt "a heart at the bottom on a striped background" \
      --seed 0 --steps 50 --out-dir out/consistory_world
  (writes 000.png … 003.png one per prompt in order, the first two the anchors, grid.png,
  result.json; --no-share-queries, --no-freeu, --no-sdsa, --mask-dropout P, --anchors N)
Python:
  from jattn.methods.consistory import consistory
  cfg = get_config(); cfg.pop("expected"); cfg.pop("method")
  out = consistory(jattn.load(), cfg.pop("subject"), cfg.pop("prompts"), **cfg)

What runs: the reference's first pass — subject-driven shared self-attention in the decoder
(anchors = the first 2 prompts; masks by Otsu on the subject token's cross maps at 8² on
this model (latent/4 with a floor of 8²; SDXL: 32², the reference's), mean of the last 20
steps; mask dropout 0.5; steps 1 … n−1), query blending toward the vanilla pass at steps
1 … n//10 (strength 0.9 → 0.818; shadow members), FreeU (b1 1.1, b2 1.2, s1 0.6, s2 0.4).
Not implemented: the second pass (DIFT feature injection).

Expected figure: the four hearts share one colour and fill while each sits at its stated
position on its stated background.

Measured (scripts/eval_consistory.py --groups 16 --seeds 0 1 2 --steps 25, bundled weights
v2, 48 groups of 4, CFG 5.0, DDIM 25 steps — 25 instead of 50 for time), ConsiStory (first
pass) vs plain generation of the same prompts and seeds:
  MEASURED
"""


def get_config():
    return dict(
        method="consistory",
        subject="heart",
        prompts=["a heart on the left on a beige background",
                 "a heart at the top on a gray background",
                 "a heart on the right on a checkered background",
                 "a heart at the bottom on a striped background"],
        seed=0, num_inference_steps=50, guidance_scale=5.0,
        n_anchors=2, mask_dropout=0.5, share_queries=True, freeu=True,
        expected="one colour and fill for the subject in every image; positions and "
                 "backgrounds as stated",
    )
