"""Attend-and-Excite on the bundled model (Chefer et al. SIGGRAPH 2023; reference
yuval-alaluf/Attend-and-Excite; diffusers StableDiffusionAttendAndExcitePipeline;
jattn/methods/excite.py).

Command:
  jattn excite --prompt "a red circle and a blue square" --excite "red circle" \
      --excite "blue square" --seed 0 --out-dir out/excite_world
Python:
  from jattn.methods.excite import attend_and_excite
  cfg = get_config(); cfg.pop("expected"); cfg.pop("method")
  out = attend_and_excite(jattn.load(), cfg.pop("prompt"), cfg.pop("excite"), **cfg)

Expected figure: both a red circle and a blue square (the plain generation of this seed may
drop one of them: catastrophic neglect).

Parity (tests/methods/test_excite.py, tiny random SD pipeline, 8² latents, attn_res (8, 8),
token_span="diffusers"): 6 steps with thresholds {0: .05, 3: .5}: max |latents jattn −
diffusers| 1.08e-4 against a plain-generation fp32 floor of 1.07e-4 (A&E moves the latents
by 1.03); 25 steps with the default thresholds {0: .05, 10: .5, 20: .8}: 1.33e-4 against a
floor of 1.35e-4 (effect 2.22).

Not measured yet: the ≥ 48-case world evaluation (scripts/eval_layout.py is not written).
"""


def get_config():
    return dict(
        method="excite",
        prompt="a red circle and a blue square",
        excite=["red circle", "blue square"],
        num_inference_steps=50, guidance_scale=7.5, seed=0,
        scale_factor=20.0, max_iter_to_alter=25, attn_res=None,
        expected="both subjects present",
    )
