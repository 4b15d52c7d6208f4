"""Diffusion schedulers as pure JAX functions, with diffusers' semantics and config names.

Five schedulers (``kind``), each matching one diffusers class step for step:

* ``"ddim"``: ``DDIMScheduler`` (+ ``eta``). Song et al., "Denoising Diffusion Implicit
  Models", ICLR 2021, eq. 12.
* ``"ddpm"``: ``DDPMScheduler``. Ho et al., "Denoising Diffusion Probabilistic Models",
  NeurIPS 2020, eq. 6-7.
* ``"euler"``: ``EulerDiscreteScheduler`` (+ ``use_karras_sigmas``). Karras et al.,
  "Elucidating the Design Space ...", NeurIPS 2022, Algorithm 2; Karras sigmas eq. 5
  (rho = 7).
* ``"euler-ancestral"``: ``EulerAncestralDiscreteScheduler``. k-diffusion's
  ``sample_euler_ancestral`` (crowsonkb/k-diffusion, k_diffusion/sampling.py): an Euler
  step to sigma_down, then fresh noise of std sigma_up (eta = 1).
* ``"dpm++2m"``: ``DPMSolverMultistepScheduler`` (``algorithm_type="dpmsolver++"``, +
  ``use_karras_sigmas``). Lu et al., "DPM-Solver++", 2022, Algorithm 2 (multistep,
  order <= 2).

Scheduler *names* (:data:`SCHEDULER_NAMES`, what ``--scheduler`` takes) are the kinds plus
presets: ``"euler-karras"`` = ``kind="euler", use_karras_sigmas=True`` and
``"dpm++2m-karras"`` = ``kind="dpm++2m", use_karras_sigmas=True`` (diffusers' "DPM++ 2M
Karras", common with SDXL). ``config.replace(kind=name)`` accepts every name.

Usage (one compiled loop; ``i`` may be a traced step index)::

    config = SchedulerConfig.from_diffusers(json.load(open("scheduler_config.json")))
    schedule = make_schedule(config, num_inference_steps=50)
    latents = noise * schedule.init_noise_sigma
    state = init_state(schedule, latents)

    def body(carry, i):
        latents, state = carry
        eps = unet(scale_model_input(schedule, latents, i), schedule.timesteps[i], ...)
        latents, state, x0 = step(schedule, state, eps, i, latents)
        return (latents, state), x0

    (latents, state), x0s = jax.lax.scan(body, (latents, state), jnp.arange(n))

Design:

* :class:`SchedulerConfig` is a frozen, hashable dataclass using diffusers' config names
  (``beta_schedule``, ``timestep_spacing``, ``steps_offset``, ``set_alpha_to_one``, ...).
* :func:`make_schedule` runs once, in numpy, before ``jit``: it builds every per-step
  scalar the update needs (``sqrt(alpha_t)``, DPM-Solver's ``exp(-h)`` terms, ...), so that
  the traced :func:`step` is a handful of element-wise ops selected by a traced index.
  :class:`Schedule` is a pytree: its arrays are leaves (changing ``eta`` or the betas
  does not recompile), ``kind``, the number of steps and the prediction type are static.
* The per-step scalars are computed in float32 with the same operation order as
  diffusers' torch code (torch's float32 ``linspace`` and double-accumulated ``cumprod``
  are emulated exactly; ``log``/``exp`` are float64 rounded to float32), and the
  element-wise updates follow diffusers' expressions term by term, so jattn and diffusers
  agree to float32 rounding (see tests/sampling/test_schedulers.py for measured figures).

Randomness (DDPM, DDIM with ``eta > 0``, Euler ancestral): :func:`step` takes ``key``,
a *batch* of PRNG keys, one per sample: typed keys shaped ``(B,)``
(``jax.random.split(key, B)``) or raw ``uint32`` keys shaped ``(B, 2)``. Sample ``b``'s
noise is drawn with ``key[b]`` alone, so image ``b`` is the same whether it is generated
alone or in a batch of 64. The scheduler uses the keys as given: the caller (the sampler)
folds the step index in (``jax.vmap(jax.random.fold_in, (0, None))(keys, i)``).
``noise=`` passes the variance noise explicitly instead (diffusers' ``variance_noise``;
edit-friendly DDPM inversion).

Layout: the schedulers are element-wise; ``sample`` is ``(B, ...)`` with the batch first
(latents ``(B, C, h, w)`` in diffusers' convention or ``(B, h, w, C)``, both work).

Not supported (raise ``NotImplementedError`` when a diffusers config asks for them):
dynamic thresholding, learned variances, DPM-Solver orders 3+, SDE/non-"++" DPM-Solver
variants, exponential/beta/Lu/flow sigmas, continuous Euler timesteps, Euler "churn".
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = [
    "KINDS",
    "SchedulerConfig",
    "Schedule",
    "SchedulerState",
    "make_schedule",
    "init_state",
    "scale_model_input",
    "step",
    "pred_x0",
    "add_noise",
    "ddim_inversion_step",
    "SCHEDULER_NAMES",
]

Kind = Literal["ddim", "ddpm", "euler", "euler-ancestral", "dpm++2m"]
KINDS: tuple[str, ...] = ("ddim", "ddpm", "euler", "euler-ancestral", "dpm++2m")

# Scheduler names users pick (``--scheduler``): every kind, plus presets that also set
# options. ``SchedulerConfig.replace(kind=name)`` applies the changes; a plain kind keeps
# the checkpoint's other options (as diffusers' ``Class.from_config(config)``).
SCHEDULER_NAMES: dict[str, dict[str, Any]] = {
    "ddim": dict(kind="ddim"),
    "ddpm": dict(kind="ddpm"),
    "euler": dict(kind="euler"),
    "euler-ancestral": dict(kind="euler-ancestral"),
    "euler-karras": dict(kind="euler", use_karras_sigmas=True),
    "dpm++2m": dict(kind="dpm++2m"),
    "dpm++2m-karras": dict(kind="dpm++2m", use_karras_sigmas=True),
}

_KIND_TO_CLASS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "dpm++2m": "DPMSolverMultistepScheduler",
}
_CLASS_TO_KIND = {v: k for k, v in _KIND_TO_CLASS.items()}

# diffusers' constructor defaults (diffusers 0.42), per class, for the keys jattn reads.
# from_diffusers fills keys missing from a config with the defaults of the class it builds,
# exactly as ``TargetScheduler.from_config(config)`` does in diffusers.
_COMMON_DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    trained_betas=None, prediction_type="epsilon", steps_offset=0,
    rescale_betas_zero_snr=False,
)
_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "ddim": dict(_COMMON_DEFAULTS, clip_sample=True, set_alpha_to_one=True,
                 clip_sample_range=1.0, timestep_spacing="leading"),
    "ddpm": dict(_COMMON_DEFAULTS, variance_type="fixed_small", clip_sample=True,
                 clip_sample_range=1.0, timestep_spacing="leading"),
    "euler": dict(_COMMON_DEFAULTS, interpolation_type="linear", use_karras_sigmas=False,
                  sigma_min=None, sigma_max=None, timestep_spacing="linspace",
                  final_sigmas_type="zero"),
    "euler-ancestral": dict(_COMMON_DEFAULTS, timestep_spacing="linspace"),
    "dpm++2m": dict(_COMMON_DEFAULTS, solver_order=2, algorithm_type="dpmsolver++",
                    solver_type="midpoint", lower_order_final=True, euler_at_final=False,
                    use_karras_sigmas=False, final_sigmas_type="zero",
                    lambda_min_clipped=-math.inf, timestep_spacing="linspace"),
}

# Keys of diffusers scheduler configs that jattn knows and that must keep their default
# (value jattn assumes) for the result to be right; anything else raises.
_MUST_BE = {
    "thresholding": False,
    "timestep_type": "discrete",
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
}
# Keys that are irrelevant to jattn's schedulers (metadata, or only used by the features
# above when switched on).
_IGNORED = {
    "_class_name", "_diffusers_version", "_name_or_path", "_use_default_values",
    "dynamic_thresholding_ratio", "sample_max_value", "flow_shift", "time_shift_type",
    "skip_prk_steps",
}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """A scheduler's configuration, in diffusers' names (frozen, hashable).

    The defaults are Stable Diffusion 1.x's (its ``scheduler_config.json`` read as a
    DDIM scheduler), not diffusers' class defaults; :meth:`from_diffusers` fills keys
    missing from a diffusers config with the class defaults, as diffusers does.

    Attributes:
      kind: ``"ddim"``, ``"ddpm"``, ``"euler"``, ``"euler-ancestral"`` or ``"dpm++2m"``
        (:meth:`replace` also takes the presets of :data:`SCHEDULER_NAMES`).
      num_train_timesteps: number of training timesteps (1000 for SD).
      beta_start, beta_end: first/last beta of the ``linear``/``scaled_linear`` schedules.
      beta_schedule: ``"linear"``, ``"scaled_linear"`` (SD: linear in sqrt(beta)) or
        ``"squaredcos_cap_v2"`` (Nichol & Dhariwal's cosine schedule).
      trained_betas: explicit betas (tuple of floats, length num_train_timesteps) or None.
      prediction_type: what the model predicts: ``"epsilon"``, ``"v_prediction"`` or
        ``"sample"``.
      timestep_spacing: ``"leading"``, ``"trailing"`` or ``"linspace"`` (Lin et al. 2023,
        "Common Diffusion Noise Schedules and Sample Steps are Flawed", table 2).
      steps_offset: added to the timesteps with ``"leading"`` spacing (SD: 1).
      set_alpha_to_one: DDIM: the last step lands on alpha_cumprod = 1 (True) or on
        ``alphas_cumprod[0]`` (False). DDPM always lands on 1, as in diffusers.
      clip_sample, clip_sample_range: DDIM/DDPM: clip the predicted x0 to +-range.
      rescale_betas_zero_snr: rescale betas to zero terminal SNR (Lin et al. 2023, alg. 1).
      eta: DDIM's noise weight (0: deterministic DDIM, 1: DDPM-like). Not a diffusers
        config key (diffusers passes it to ``step``); :meth:`to_diffusers` leaves it out.
      variance_type: DDPM: ``"fixed_small"``, ``"fixed_small_log"`` or ``"fixed_large"``.
      solver_order: DPM-Solver++: 1 or 2.
      algorithm_type: DPM-Solver: only ``"dpmsolver++"``.
      solver_type: DPM-Solver++ second-order rule: ``"midpoint"`` or ``"heun"``.
      lower_order_final: DPM-Solver++: first-order last step when fewer than 15 steps.
      euler_at_final: DPM-Solver++: always a first-order (Euler) last step.
      use_karras_sigmas: Euler/DPM-Solver++: Karras et al.'s rho=7 noise levels (ignored
        by the other kinds, as their diffusers classes have no such option).
      sigma_min, sigma_max: Euler: bounds of the Karras sigmas (None: the schedule's).
      final_sigmas_type: Euler/DPM-Solver++: last noise level ``"zero"`` or ``"sigma_min"``.
      interpolation_type: Euler: only ``"linear"``.
      lambda_min_clipped: DPM-Solver++: clip log-SNR from below (-inf: no clipping).
    """

    kind: Kind = "ddim"
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    rescale_betas_zero_snr: bool = False
    eta: float = 0.0
    variance_type: str = "fixed_small"
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    final_sigmas_type: str = "zero"
    interpolation_type: str = "linear"
    lambda_min_clipped: float = -math.inf

    def __post_init__(self):
        if self.trained_betas is not None and not isinstance(self.trained_betas, tuple):
            object.__setattr__(self, "trained_betas",
                               tuple(float(b) for b in np.asarray(self.trained_betas)))
        _validate(self)

    def replace(self, **changes) -> "SchedulerConfig":
        """A copy with ``changes`` applied, e.g. ``config.replace(kind="ddim", eta=1.0)``
        switches the scheduler and keeps the betas and spacing. ``kind`` may be any name
        of :data:`SCHEDULER_NAMES`: ``replace(kind="dpm++2m-karras")`` is
        ``replace(kind="dpm++2m", use_karras_sigmas=True)`` (explicit ``changes`` win).
        Raises ValueError / NotImplementedError for invalid or unsupported values."""
        name = changes.get("kind")
        if isinstance(name, str) and name in SCHEDULER_NAMES and name not in KINDS:
            changes = {**SCHEDULER_NAMES[name], **{k: v for k, v in changes.items()
                                                   if k != "kind"}}
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], kind: str | None = None,
                       strict: bool = True) -> "SchedulerConfig":
        """Reads a diffusers ``scheduler_config.json`` dict.

        ``_class_name`` picks the kind: DDIMScheduler -> "ddim", DDPMScheduler -> "ddpm",
        EulerDiscreteScheduler -> "euler", EulerAncestralDiscreteScheduler ->
        "euler-ancestral", DPMSolverMultistepScheduler -> "dpm++2m". Every
        other class (PNDMScheduler, LMSDiscreteScheduler, ... e.g. SD 1.x's PNDM) maps to
        "ddim" with the same betas, spacing and offset, which is what
        ``DDIMScheduler.from_config(config)`` gives in diffusers. ``kind`` overrides the
        class (e.g. read SD's PNDM config as "euler"). Keys missing from ``config`` take
        the defaults of the diffusers class of the resulting kind, as ``from_config``.

        Raises:
          ValueError: no ``_class_name`` and no ``kind``; an unknown key in the config of
            one of the four native classes (when ``strict``); an invalid value (a value of
            the wrong type or out of range raises ``jattn.io.checkpoint.CheckpointConfigError``,
            a ValueError naming the key, the value and what is expected).
          NotImplementedError: a feature jattn does not implement is switched on
            (thresholding, learned variance, solver_order 3, SDE DPM-Solver, ...).
        """
        from jattn.io import checkpoint as ck

        o = "SchedulerConfig"
        if not isinstance(config, Mapping):
            raise ck.CheckpointConfigError(
                f"{o}: expected a dict (the object of scheduler/scheduler_config.json), got "
                f"{type(config).__name__}.")
        config = dict(config)
        class_name = config.get("_class_name")
        if class_name is not None:
            ck.config_str(o, "_class_name", class_name, hint=", e.g. \"DDIMScheduler\"")
        if kind is None:
            if class_name is None:
                raise ValueError("config has no `_class_name`; pass `kind=`.")
            kind = _CLASS_TO_KIND.get(class_name, "ddim")
        if kind not in KINDS:
            raise ValueError(f"unknown scheduler kind {kind!r}; expected one of {KINDS}")
        native = class_name == _KIND_TO_CLASS[kind]

        for key, want in _MUST_BE.items():
            if key in config and config[key] != want and config[key] is not None:
                raise NotImplementedError(
                    f"scheduler config {key}={config[key]!r} is not supported by jattn "
                    f"(needs {want!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        if strict and native:
            unknown = sorted(k for k in config
                             if k not in fields and k not in _MUST_BE and k not in _IGNORED)
            if unknown:
                raise ValueError(f"unknown keys in {class_name} config: {unknown} "
                                 "(pass strict=False to ignore them)")

        values = dict(_CLASS_DEFAULTS[kind])
        nullable = ("trained_betas", "sigma_min", "sigma_max")
        for key in fields:
            if key in config and key != "kind":
                if config[key] is None and key not in nullable:
                    continue  # diffusers writes null for "use the default"
                values[key] = config[key]
        if kind == "dpm++2m":
            # DPMSolverMultistepScheduler's variance_type is about learned variances
            # (None / "learned" / "learned_range"); DDPM's fixed variance is unrelated.
            if config.get("variance_type") is not None:
                raise NotImplementedError(
                    "DPM-Solver with learned variance (variance_type="
                    f"{config['variance_type']!r}) is not supported")
            values.pop("variance_type", None)
        if values.get("lambda_min_clipped") is None:
            values["lambda_min_clipped"] = -math.inf

        # types and ranges (the choices of the string options are checked by _validate)
        def beta(o_, k, v):
            return ck.config_float(o_, k, v, minimum=0.0, maximum=0.999,
                                   hint=" (a per-step noise variance; SD: 0.00085 to 0.012)")

        def pos_or_none(o_, k, v):
            return None if v is None else ck.config_float(o_, k, v, positive=True)

        checks = {
            "num_train_timesteps": lambda o_, k, v: ck.config_int(o_, k, v, minimum=1,
                                                                  hint=" (SD: 1000)"),
            "steps_offset": lambda o_, k, v: ck.config_int(o_, k, v, minimum=0),
            "solver_order": lambda o_, k, v: ck.config_int(o_, k, v, minimum=1),
            "beta_start": beta, "beta_end": beta,
            "trained_betas": lambda o_, k, v: None if v is None else ck.config_list(
                o_, k, v.tolist() if isinstance(v, np.ndarray) else v, beta,
                what="numbers in [0.0, 0.999]"),
            "clip_sample_range": lambda o_, k, v: ck.config_float(o_, k, v, positive=True),
            "eta": lambda o_, k, v: ck.config_float(o_, k, v, minimum=0.0),
            "sigma_min": pos_or_none, "sigma_max": pos_or_none,
            "lambda_min_clipped": lambda o_, k, v: ck.config_float(o_, k, v, allow_inf=True),
        }
        for key in ("set_alpha_to_one", "clip_sample", "rescale_betas_zero_snr",
                    "lower_order_final", "euler_at_final", "use_karras_sigmas"):
            checks[key] = ck.config_bool
        for key in ("beta_schedule", "prediction_type", "timestep_spacing", "variance_type",
                    "algorithm_type", "solver_type", "final_sigmas_type", "interpolation_type"):
            checks[key] = ck.config_str
        for key, check in checks.items():
            if key in values:
                values[key] = check(o, key, values[key])
        return cls(kind=kind, **values)

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers config dict of this scheduler (``_class_name`` + the keys its
        class reads), e.g. to write ``scheduler/scheduler_config.json`` or to build the
        torch scheduler with ``Class.from_config``. ``eta`` is not a diffusers config key
        and is left out."""
        common = ["num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                  "trained_betas", "prediction_type", "timestep_spacing", "steps_offset",
                  "rescale_betas_zero_snr"]
        per_kind = {
            "ddim": ["clip_sample", "set_alpha_to_one", "clip_sample_range"],
            "ddpm": ["variance_type", "clip_sample", "clip_sample_range"],
            "euler": ["interpolation_type", "use_karras_sigmas", "sigma_min", "sigma_max",
                      "final_sigmas_type"],
            "euler-ancestral": [],
            "dpm++2m": ["solver_order", "algorithm_type", "solver_type",
                        "lower_order_final", "euler_at_final", "use_karras_sigmas",
                        "final_sigmas_type", "lambda_min_clipped"],
        }[self.kind]
        out: dict[str, Any] = {"_class_name": _KIND_TO_CLASS[self.kind]}
        for key in common + per_kind:
            value = getattr(self, key)
            out[key] = list(value) if isinstance(value, tuple) else value
        if self.kind == "euler":
            out["timestep_type"] = "discrete"
        if self.kind in ("ddim", "ddpm", "dpm++2m"):
            out["thresholding"] = False
        return out


def _validate(c: SchedulerConfig) -> None:
    def one_of(name, allowed, exc=ValueError):
        if getattr(c, name) not in allowed:
            raise exc(f"{name}={getattr(c, name)!r} not supported; expected one of {allowed}")

    one_of("kind", KINDS)
    one_of("beta_schedule", ("linear", "scaled_linear", "squaredcos_cap_v2"),
           NotImplementedError)
    one_of("prediction_type", ("epsilon", "v_prediction", "sample"), NotImplementedError)
    one_of("timestep_spacing", ("leading", "trailing", "linspace"))
    one_of("variance_type", ("fixed_small", "fixed_small_log", "fixed_large"),
           NotImplementedError)
    one_of("solver_order", (1, 2), NotImplementedError)
    one_of("algorithm_type", ("dpmsolver++",), NotImplementedError)
    one_of("solver_type", ("midpoint", "heun"), NotImplementedError)
    one_of("final_sigmas_type", ("zero", "sigma_min"))
    one_of("interpolation_type", ("linear",), NotImplementedError)
    if c.num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {c.num_train_timesteps}")
    if c.trained_betas is not None and len(c.trained_betas) != c.num_train_timesteps:
        raise ValueError(f"trained_betas has {len(c.trained_betas)} entries, expected "
                         f"num_train_timesteps={c.num_train_timesteps}")
    if c.eta < 0:
        raise ValueError(f"eta must be >= 0, got {c.eta}")
    if c.eta != 0 and c.kind != "ddim":
        raise ValueError(f"eta is a DDIM parameter; got eta={c.eta} with kind={c.kind!r}")


# --------------------------------------------------------------------------------------
# Numerics of the schedule constants (numpy, float32 in diffusers' operation order).
# --------------------------------------------------------------------------------------

_f32 = np.float32
_EULER_KINDS = ("euler", "euler-ancestral")


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` on CPU, bit for bit:
    step = (end - start) / (steps - 1) in float32, first half ``start + step*i`` and
    second half ``end - step*(steps-1-i)``, each with one (fused) rounding."""
    s, e = _f32(start), _f32(end)
    if steps == 1:
        return np.array([s], np.float32)
    step = _f32(_f32(e - s) / _f32(steps - 1))
    i = np.arange(steps)
    fwd = (np.float64(s) + np.float64(step) * i).astype(np.float32)
    bwd = (np.float64(e) - np.float64(step) * (steps - 1 - i)).astype(np.float32)
    return np.where(i < steps // 2, fwd, bwd)


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal 2021 (improved DDPM) cosine schedule, eq. 17, as diffusers'
    ``betas_for_alpha_bar`` (python floats, then float32)."""
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    n = num_train_timesteps
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta)
                     for i in range(n)], np.float32)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    """torch's CPU cumprod of float32: accumulates in float64, rounds each output."""
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, algorithm 1 (float32, diffusers' operation order)."""
    alphas = _f32(1.0) - betas
    sqrt_ab = np.sqrt(_cumprod_f32(alphas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = sqrt_ab - last
    sqrt_ab = sqrt_ab * _f32(first / _f32(first - last))
    ab = sqrt_ab * sqrt_ab
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return _f32(1.0) - alphas


def _betas(c: SchedulerConfig) -> np.ndarray:
    if c.trained_betas is not None:
        betas = np.asarray(c.trained_betas, np.float32)
    elif c.beta_schedule == "linear":
        betas = _torch_linspace_f32(c.beta_start, c.beta_end, c.num_train_timesteps)
    elif c.beta_schedule == "scaled_linear":
        b = _torch_linspace_f32(c.beta_start ** 0.5, c.beta_end ** 0.5, c.num_train_timesteps)
        betas = b * b
    else:
        betas = _cosine_betas(c.num_train_timesteps)
    if c.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def _alphas_cumprod(c: SchedulerConfig) -> np.ndarray:
    """alpha_bar_t, float32, shape (num_train_timesteps,)."""
    ac = _cumprod_f32(_f32(1.0) - _betas(c))
    if c.rescale_betas_zero_snr and c.kind in ("euler", "euler-ancestral", "dpm++2m"):
        ac[-1] = _f32(2.0 ** -24)  # as diffusers: keeps sigma finite at t = T-1
    return ac


def _log32(x) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(x, np.float64)).astype(np.float32)


def _exp32(x) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.exp(np.asarray(x, np.float64)).astype(np.float32)


def _discrete_timesteps(c: SchedulerConfig, n: int) -> np.ndarray:
    """DDIM/DDPM timesteps (int64, descending)."""
    T = c.num_train_timesteps
    if c.timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    if c.timestep_spacing == "leading":
        ratio = T // n
        return (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64) + c.steps_offset
    return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1


def _sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    """Fractional training timestep of a noise level (log-sigma interpolation),
    as diffusers' ``_sigma_to_t``."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(np.shape(sigma))


def _karras(in_sigmas: np.ndarray, n: int, sigma_min=None, sigma_max=None) -> np.ndarray:
    """Karras et al. 2022 eq. 5 noise levels (rho = 7), float64 as diffusers."""
    sigma_min = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    sigma_max = sigma_max if sigma_max is not None else in_sigmas[0].item()
    rho = 7.0
    ramp = np.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _final_sigma(c: SchedulerConfig, ac: np.ndarray):
    if c.final_sigmas_type == "sigma_min":
        return np.sqrt(_f32(1.0 - ac[0]) / ac[0])
    return 0


def _ve_sigma(alpha_cumprod) -> np.ndarray:
    """sqrt((1 - alpha_bar) / alpha_bar), float32."""
    a = np.asarray(alpha_cumprod, np.float32)
    with np.errstate(divide="ignore"):
        return np.sqrt((_f32(1.0) - a) / a)


# --------------------------------------------------------------------------------------
# Pytrees.
# --------------------------------------------------------------------------------------


@flax.struct.dataclass
class Schedule:
    """Everything a scheduler needs for ``num_inference_steps`` steps (a pytree).

    Arrays are leaves (change them without recompiling); ``kind``,
    ``num_inference_steps`` and the other scalars below are static.

    Attributes:
      timesteps: (n,) the timesteps the model is called with, descending. int32 for
        "ddim"/"ddpm"/"dpm++2m"; float32 for "euler"/"euler-ancestral" (diffusers' Euler
        timesteps are fractional with linspace spacing or Karras sigmas).
      sigmas: (n+1,) float32 noise level of the sample before each step, as
        sqrt((1 - alpha_bar)/alpha_bar) (the "VE" sigma); entry n is the level after the
        last step. Euler/DPM-Solver++ step on these; for DDIM/DDPM they are informative
        (e.g. guidance step sizes that scale with sigma_t^2).
      alphas_cumprod: (num_train_timesteps,) float32 alpha_bar.
      final_alpha_cumprod: () float32, DDIM's alpha_bar after the last step.
      init_noise_sigma: () float32, the scale of the initial noise (1, or Euler's
        max sigma).
      coef: dict of (n,) or (n+1,) float32 per-step constants of the update (internal).
      kind, num_inference_steps, num_train_timesteps, prediction_type, clip_sample,
      clip_sample_range, solver_order: static copies of the config.
      stochastic: static; whether :func:`step` adds noise (DDPM, DDIM with eta > 0,
        Euler ancestral).
    """

    timesteps: Array
    sigmas: Array
    alphas_cumprod: Array
    final_alpha_cumprod: Array
    init_noise_sigma: Array
    coef: dict[str, Array]
    kind: str = flax.struct.field(pytree_node=False, default="ddim")
    num_inference_steps: int = flax.struct.field(pytree_node=False, default=0)
    num_train_timesteps: int = flax.struct.field(pytree_node=False, default=1000)
    prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")
    clip_sample: bool = flax.struct.field(pytree_node=False, default=False)
    clip_sample_range: float = flax.struct.field(pytree_node=False, default=1.0)
    solver_order: int = flax.struct.field(pytree_node=False, default=2)
    stochastic: bool = flax.struct.field(pytree_node=False, default=False)


@flax.struct.dataclass
class SchedulerState:
    """What a multistep scheduler carries between steps (a pytree).

    Attributes:
      prev_x0: "dpm++2m": (B, ...) the previous step's x0 prediction (zeros before the
        first step); None for the single-step schedulers.
      lower_order_nums: () int32, how many steps ran since :func:`init_state` (capped at
        the solver order); diffusers' ``lower_order_nums``.
    """

    prev_x0: Array | None
    lower_order_nums: Array


def make_schedule(config: SchedulerConfig, num_inference_steps: int) -> Schedule:
    """Builds the :class:`Schedule` of ``config`` for ``num_inference_steps`` steps
    (numpy, outside ``jit``), as diffusers' ``scheduler.set_timesteps(n)``.

    ``schedule.num_inference_steps`` is ``len(timesteps)``, which for "trailing" spacing
    and a few step counts (e.g. 61) is one more than requested, exactly as in diffusers.

    Raises:
      ValueError: ``num_inference_steps`` < 1 or > ``num_train_timesteps``.
    """
    c = config
    n_req = int(num_inference_steps)
    if not 1 <= n_req <= c.num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in [1, {c.num_train_timesteps}], "
                         f"got {num_inference_steps}")
    ac = _alphas_cumprod(c)
    build = {"ddim": _build_ddim, "ddpm": _build_ddpm, "euler": _build_euler,
             "euler-ancestral": _build_euler_ancestral, "dpm++2m": _build_dpm}[c.kind]
    timesteps, sigmas, final_ac, init_sigma, coef = build(c, ac, n_req)
    ts_dtype = np.float32 if c.kind in _EULER_KINDS else np.int32
    return Schedule(
        timesteps=jnp.asarray(np.asarray(timesteps).astype(ts_dtype)),
        sigmas=jnp.asarray(np.asarray(sigmas, np.float32)),
        alphas_cumprod=jnp.asarray(ac),
        final_alpha_cumprod=jnp.asarray(_f32(final_ac)),
        init_noise_sigma=jnp.asarray(_f32(init_sigma)),
        coef={k: jnp.asarray(np.asarray(v, np.float32)) for k, v in coef.items()},
        kind=c.kind,
        num_inference_steps=len(timesteps),
        num_train_timesteps=c.num_train_timesteps,
        prediction_type=c.prediction_type,
        clip_sample=bool(c.clip_sample) and c.kind in ("ddim", "ddpm"),
        clip_sample_range=float(c.clip_sample_range),
        solver_order=int(c.solver_order),
        stochastic=c.kind in ("ddpm", "euler-ancestral") or (c.kind == "ddim" and c.eta > 0),
    )


def _build_ddim(c, ac, n_req):
    # DDIMScheduler.step: prev_timestep = t - T // n whatever the spacing.
    ts = _discrete_timesteps(c, n_req)
    final = _f32(1.0) if c.set_alpha_to_one else ac[0]
    prev_ts = ts - c.num_train_timesteps // n_req
    a_t = ac[ts]
    a_prev = np.where(prev_ts >= 0, ac[np.clip(prev_ts, 0, None)], final).astype(np.float32)
    beta_t = _f32(1.0) - a_t
    beta_prev = _f32(1.0) - a_prev
    with np.errstate(divide="ignore", invalid="ignore"):
        variance = (beta_prev / beta_t) * (_f32(1.0) - a_t / a_prev)
    std = _f32(c.eta) * np.sqrt(variance)
    coef = dict(
        sqrt_alpha=np.sqrt(a_t), sqrt_beta=np.sqrt(beta_t),
        sqrt_alpha_prev=np.sqrt(a_prev), sqrt_beta_prev=np.sqrt(beta_prev),
        # exactly 0 where a_t = 0 (zero terminal SNR, eta = 1): float rounding can make it
        # -1e-8, whose sqrt is NaN (diffusers' DDIMScheduler then returns NaN latents)
        dir=np.sqrt(np.maximum((_f32(1.0) - a_prev) - std * std, _f32(0.0))), std=std,
    )
    sigmas = np.concatenate([_ve_sigma(a_t), _ve_sigma(a_prev[-1:])])
    return ts, sigmas, final, 1.0, coef


def _build_ddpm(c, ac, n_req):
    # DDPMScheduler: the previous timestep is the next entry of the list; after the last
    # step alpha_bar = 1; noise is added unless t == 0.
    ts = _discrete_timesteps(c, n_req)
    prev_ts = np.concatenate([ts[1:], [-1]])
    a_t = ac[ts]
    a_prev = np.where(prev_ts >= 0, ac[np.clip(prev_ts, 0, None)], _f32(1.0)).astype(np.float32)
    beta_t = _f32(1.0) - a_t
    beta_prev = _f32(1.0) - a_prev
    cur_alpha = a_t / a_prev
    cur_beta = _f32(1.0) - cur_alpha
    variance = np.maximum((_f32(1.0) - a_prev) / (_f32(1.0) - a_t) * cur_beta, _f32(1e-20))
    if c.variance_type == "fixed_small":
        std = np.sqrt(variance)
    elif c.variance_type == "fixed_small_log":
        std = _exp32(_f32(0.5) * _log32(variance))
    else:  # fixed_large
        std = np.sqrt(cur_beta)
    std = np.where(ts > 0, std, _f32(0.0))
    coef = dict(
        sqrt_alpha=np.sqrt(a_t), sqrt_beta=np.sqrt(beta_t),
        x0_coeff=(np.sqrt(a_prev) * cur_beta) / beta_t,
        sample_coeff=(np.sqrt(cur_alpha) * beta_prev) / beta_t,
        std=std,
    )
    sigmas = np.concatenate([_ve_sigma(a_t), [0.0]])
    return ts, sigmas, 1.0, 1.0, coef


def _build_euler(c, ac, n_req):
    T, n = c.num_train_timesteps, n_req
    if c.timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    elif c.timestep_spacing == "leading":
        ratio = T // n
        ts = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.float32)
        ts += c.steps_offset
    else:
        ts = np.arange(T, 0, -T / n).round().copy().astype(np.float32)
        ts -= 1
    train_sigmas = _ve_sigma(ac)
    log_sigmas = np.log(train_sigmas)
    sigmas = np.interp(ts, np.arange(0, len(train_sigmas)), train_sigmas)
    if c.use_karras_sigmas:
        sigmas = _karras(sigmas, n, c.sigma_min, c.sigma_max)
        ts = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
    sigmas = np.concatenate([sigmas, [_final_sigma(c, ac)]]).astype(np.float32)
    ts = ts.astype(np.float32)
    max_sigma = sigmas.max()
    if c.timestep_spacing in ("linspace", "trailing"):
        init_sigma = max_sigma
    else:
        init_sigma = np.sqrt(max_sigma * max_sigma + _f32(1.0))
    s = sigmas[:-1]
    c_in = np.sqrt(s * s + _f32(1.0))
    coef = dict(
        c_in=c_in,                      # scale_model_input divides by sqrt(sigma^2 + 1)
        v_out=(-s) / c_in,              # v-prediction: x0 = v * v_out + x / v_den
        v_den=s * s + _f32(1.0),
        dt=sigmas[1:] - s,
    )
    return ts, sigmas, 1.0, init_sigma, coef


def _build_euler_ancestral(c, ac, n_req):
    # EulerAncestralDiscreteScheduler: Euler's timesteps/sigmas (no Karras option), and
    # sigma_up / sigma_down of k-diffusion's get_ancestral_step (eta = 1), float32 in
    # diffusers' operation order.
    ts, sigmas, _, init_sigma, coef = _build_euler(
        dataclasses.replace(c, kind="euler", use_karras_sigmas=False,
                            final_sigmas_type="zero"), ac, n_req)
    s_from, s_to = sigmas[:-1], sigmas[1:]
    sigma_up = np.sqrt(s_to * s_to * (s_from * s_from - s_to * s_to) / (s_from * s_from))
    # >= 0 mathematically (s_to^2 * s_to^2 / s_from^2); clamp float rounding (diffusers: NaN)
    sigma_down = np.sqrt(np.maximum(s_to * s_to - sigma_up * sigma_up, _f32(0.0)))
    coef = dict(coef, dt=sigma_down - s_from, sigma_up=sigma_up)
    return ts, sigmas, 1.0, init_sigma, coef


def _build_dpm(c, ac, n_req):
    T, n = c.num_train_timesteps, n_req
    # log-SNR clipping (diffusers: searchsorted on the flipped lambda_t).
    alpha_t = np.sqrt(ac)
    sigma_t = np.sqrt(_f32(1.0) - ac)
    lambda_t = _log32(alpha_t) - _log32(sigma_t)
    clipped_idx = int(np.searchsorted(lambda_t[::-1], c.lambda_min_clipped, side="left"))
    last = T - clipped_idx
    if c.timestep_spacing == "linspace":
        ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    elif c.timestep_spacing == "leading":
        ratio = last // (n + 1)
        ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
        ts += c.steps_offset
    else:
        ts = np.arange(last, 0, -T / n).round().copy().astype(np.int64) - 1
    train_sigmas = _ve_sigma(ac)
    log_sigmas = np.log(train_sigmas)
    if c.use_karras_sigmas:
        sigmas = _karras(np.flip(train_sigmas).copy(), n)
        ts = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        if c.beta_schedule != "squaredcos_cap_v2":
            ts = ts.round()
    else:
        sigmas = np.interp(ts, np.arange(0, len(train_sigmas)), train_sigmas)
    sigmas = np.concatenate([sigmas, [_final_sigma(c, ac)]]).astype(np.float32)
    ts = ts.astype(np.int64)
    n = len(ts)

    # Per-step constants of DPM-Solver++ (2M), in diffusers' float32 operation order.
    alpha = _f32(1.0) / np.sqrt(sigmas * sigmas + _f32(1.0))    # (n+1,) alpha_t (VP)
    sigma_vp = sigmas * alpha                                   # (n+1,) sigma_t (VP)
    lam = _log32(alpha) - _log32(sigma_vp)                      # log-SNR/2; +inf at 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        h = lam[1:] - lam[:-1]                                  # (n,)
        ratio = sigma_vp[1:] / sigma_vp[:-1]
        em1 = _exp32(-h) - _f32(1.0)                            # exp(-h) - 1
        b = alpha[1:] * em1
        if c.solver_type == "midpoint":
            d1 = _f32(0.5) * b
        else:  # heun: x - b D0 + a (em1/h + 1) D1  ==  x - b D0 - (-(a (em1/h + 1))) D1
            d1 = -(alpha[1:] * (em1 / h + _f32(1.0)))
        h0 = np.concatenate([[_f32(0.0)], lam[1:-1] - lam[:-2]]).astype(np.float32)
        r0 = h0 / h
        inv_r0 = _f32(1.0) / r0
    inv_r0[0] = 0.0  # the first step is always first order
    d1 = np.where(np.isfinite(d1), d1, _f32(0.0))
    inv_r0 = np.where(np.isfinite(inv_r0), inv_r0, _f32(0.0))
    idx = np.arange(n)
    first_order_final = (idx == n - 1) & (
        c.euler_at_final or (c.lower_order_final and n < 15) or c.final_sigmas_type == "zero")
    coef = dict(
        alpha=alpha, sigma_vp=sigma_vp, ratio=ratio, b=b, d1=d1, inv_r0=inv_r0,
        force_first=first_order_final.astype(np.float32),
    )
    return ts, sigmas, 1.0, 1.0, coef


# --------------------------------------------------------------------------------------
# Traced functions.
# --------------------------------------------------------------------------------------


def init_state(schedule: Schedule, sample: Array) -> SchedulerState:
    """The scheduler state before the first step (diffusers' state right after
    ``set_timesteps``).

    Args:
      schedule: from :func:`make_schedule`.
      sample: (B, ...) latents, for the shape/dtype of DPM-Solver++'s carried x0.
    """
    prev = jnp.zeros(sample.shape, jnp.float32) if schedule.kind == "dpm++2m" else None
    return SchedulerState(prev_x0=prev, lower_order_nums=jnp.zeros((), jnp.int32))


def scale_model_input(schedule: Schedule, sample: Array, i) -> Array:
    """The model input at step ``i``: Euler (and Euler ancestral) divides by
    sqrt(sigma_i^2 + 1), the others return ``sample`` unchanged.

    Args:
      sample: (B, ...) latents; i: step index (int or traced int32 scalar), 0 <= i < n.
    Returns: (B, ...) same dtype as ``sample``.
    """
    if schedule.kind not in _EULER_KINDS:
        return sample
    return (sample / schedule.coef["c_in"][i]).astype(sample.dtype)


def _alpha_x0_eps(schedule: Schedule, model_output, i, sample, want_eps: bool):
    """DDIM/DDPM: (x0, eps) from the model output at step i (x0 before clipping)."""
    sa = schedule.coef["sqrt_alpha"][i]
    sb = schedule.coef["sqrt_beta"][i]
    p = schedule.prediction_type
    if p == "epsilon":
        x0 = (sample - sb * model_output) / sa
        eps = model_output
    elif p == "sample":
        x0 = model_output
        eps = (sample - sa * x0) / sb if want_eps else None
    else:  # v_prediction
        x0 = sa * sample - sb * model_output
        eps = sa * model_output + sb * sample if want_eps else None
    return x0, eps


def _clip(schedule: Schedule, x0):
    if schedule.clip_sample:
        r = schedule.clip_sample_range
        return jnp.clip(x0, -r, r)
    return x0


def _euler_x0(schedule: Schedule, model_output, i, sample):
    p = schedule.prediction_type
    if p == "epsilon":
        return sample - schedule.sigmas[i] * model_output
    if p == "sample":
        return model_output
    return model_output * schedule.coef["v_out"][i] + sample / schedule.coef["v_den"][i]


def _dpm_x0(schedule: Schedule, model_output, i, sample):
    p = schedule.prediction_type
    a = schedule.coef["alpha"][i]
    s = schedule.coef["sigma_vp"][i]
    if p == "epsilon":
        return (sample - s * model_output) / a
    if p == "sample":
        return model_output
    return a * sample - s * model_output


def pred_x0(schedule: Schedule, model_output: Array, i, sample: Array) -> Array:
    """The model's prediction of the clean latents x0 at step ``i`` (what :func:`step`
    returns as ``pred_original_sample``; clipped when ``clip_sample``).

    Args:
      model_output: (B, ...) the model's eps / v / x0 prediction at ``timesteps[i]``.
      i: step index (int or traced int32 scalar).
      sample: (B, ...) the latents the model saw (before :func:`scale_model_input`).
    Returns: (B, ...) float32.
    """
    model_output = jnp.asarray(model_output, jnp.float32)
    sample = jnp.asarray(sample, jnp.float32)
    if schedule.kind in ("ddim", "ddpm"):
        return _clip(schedule, _alpha_x0_eps(schedule, model_output, i, sample, False)[0])
    if schedule.kind in _EULER_KINDS:
        return _euler_x0(schedule, model_output, i, sample)
    return _dpm_x0(schedule, model_output, i, sample)


def _per_sample_normal(key, shape, dtype=jnp.float32) -> Array:
    """Standard normal noise of ``shape`` = (B, ...), sample b drawn with key[b] only."""
    batch = shape[0]
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != (batch,):
            raise ValueError(f"expected one typed PRNG key per sample, shape ({batch},); "
                             f"got {key.shape} (use jax.random.split(key, B))")
    elif key.ndim != 2 or key.shape[0] != batch:
        raise ValueError(f"expected one raw PRNG key per sample, shape ({batch}, 2); got "
                         f"{key.shape} (use jax.random.split(key, B))")
    return jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype))(key)


def _variance_noise(schedule, sample, key, noise):
    if noise is not None:
        noise = jnp.asarray(noise, jnp.float32)
        if noise.shape != sample.shape:
            raise ValueError(f"noise shape {noise.shape} != sample shape {sample.shape}")
        return noise
    if key is None:
        raise ValueError(f"scheduler kind={schedule.kind!r} is stochastic "
                         "(DDPM, DDIM with eta > 0, Euler ancestral): pass `key` (one per "
                         "sample) or `noise`")
    return _per_sample_normal(key, sample.shape)


def step(schedule: Schedule, state: SchedulerState, model_output: Array, i,
         sample: Array, key: Array | None = None, noise: Array | None = None,
         ) -> tuple[Array, SchedulerState, Array]:
    """One denoising step from ``timesteps[i]`` to the next noise level
    (diffusers' ``scheduler.step(model_output, timesteps[i], sample)``).

    Args:
      schedule: from :func:`make_schedule`.
      state: from :func:`init_state` or the previous step.
      model_output: (B, ...) the model's prediction (eps / v / x0 per
        ``prediction_type``) at ``timesteps[i]`` for the input
        ``scale_model_input(schedule, sample, i)``.
      i: step index, 0 <= i < n (python int or traced int32 scalar; steps must be taken
        in order i = k, k+1, ... for "dpm++2m", whose state carries the previous x0).
      sample: (B, ...) the current latents x_t (not scaled).
      key: stochastic schedulers only (DDPM, DDIM with eta > 0, Euler ancestral;
        ignored otherwise):
        a batch of PRNG keys, typed ``(B,)`` or raw ``(B, 2)`` uint32; sample b's noise
        is drawn with ``key[b]`` alone. Fold the step index in before calling.
      noise: (B, ...) explicit standard-normal variance noise instead of ``key``
        (diffusers' ``variance_noise``); takes precedence over ``key``.

    Returns:
      ``(prev_sample, state, pred_original_sample)``: the latents at the next noise level
      (B, ...) in ``sample``'s dtype, the new state, and the x0 prediction (B, ...)
      float32.

    Raises:
      ValueError: stochastic scheduler without ``key``/``noise``; badly shaped keys/noise.
    """
    kind = schedule.kind
    out_dtype = sample.dtype
    x = jnp.asarray(sample, jnp.float32)
    m = jnp.asarray(model_output, jnp.float32)
    cf = schedule.coef
    if kind == "ddim":
        x0, eps = _alpha_x0_eps(schedule, m, i, x, True)
        x0 = _clip(schedule, x0)
        prev = cf["sqrt_alpha_prev"][i] * x0 + cf["dir"][i] * eps
        if schedule.stochastic:
            prev = prev + cf["std"][i] * _variance_noise(schedule, x, key, noise)
    elif kind == "ddpm":
        x0, _ = _alpha_x0_eps(schedule, m, i, x, False)
        x0 = _clip(schedule, x0)
        prev = cf["x0_coeff"][i] * x0 + cf["sample_coeff"][i] * x
        prev = prev + cf["std"][i] * _variance_noise(schedule, x, key, noise)
    elif kind in _EULER_KINDS:
        sigma = schedule.sigmas[i]
        x0 = _euler_x0(schedule, m, i, x)
        derivative = (x - x0) / sigma
        prev = x + derivative * cf["dt"][i]  # ancestral: dt = sigma_down - sigma
        if kind == "euler-ancestral":
            prev = prev + _variance_noise(schedule, x, key, noise) * cf["sigma_up"][i]
    else:  # dpm++2m
        x0 = _dpm_x0(schedule, m, i, x)
        first = cf["ratio"][i] * x - cf["b"][i] * x0
        if schedule.solver_order == 2:
            d1 = cf["inv_r0"][i] * (x0 - state.prev_x0)
            second = cf["ratio"][i] * x - cf["b"][i] * x0 - cf["d1"][i] * d1
            use_first = (state.lower_order_nums < 1) | (cf["force_first"][i] > 0)
            prev = jnp.where(use_first, first, second)
        else:
            prev = first
        state = SchedulerState(
            prev_x0=x0,
            lower_order_nums=jnp.minimum(state.lower_order_nums + 1, schedule.solver_order))
        return prev.astype(out_dtype), state, x0
    state = state.replace(lower_order_nums=jnp.minimum(state.lower_order_nums + 1, 1))
    return prev.astype(out_dtype), state, x0


def add_noise(schedule_or_config: Schedule | SchedulerConfig, original: Array,
              noise: Array, timesteps) -> Array:
    """Forward diffusion to ``timesteps`` (diffusers' ``scheduler.add_noise``).

    DDIM/DDPM (or a config): ``sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise``.
    Euler: ``x0 + sigma noise``; DPM-Solver++: ``alpha_t x0 + sigma_t noise``, with the
    noise level of the step whose timestep equals ``t`` (these need a :class:`Schedule`;
    an unknown timestep takes the last step's level, as DPM-Solver in diffusers).

    Args:
      original: (B, ...) clean latents. noise: (B, ...) standard normal.
      timesteps: () or (B,) training timesteps (int; float for Euler).
    Returns: (B, ...) float32.
    """
    x = jnp.asarray(original, jnp.float32)
    z = jnp.asarray(noise, jnp.float32)
    t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (x.shape[0],))
    expand = (slice(None),) + (None,) * (x.ndim - 1)
    s = schedule_or_config
    if isinstance(s, SchedulerConfig) or s.kind in ("ddim", "ddpm"):
        ac = (jnp.asarray(_alphas_cumprod(s)) if isinstance(s, SchedulerConfig)
              else s.alphas_cumprod)[t.astype(jnp.int32)]
        return jnp.sqrt(ac)[expand] * x + jnp.sqrt(1.0 - ac)[expand] * z
    matches = s.timesteps[None, :] == t.astype(s.timesteps.dtype)[:, None]   # (B, n)
    count = matches.sum(-1)
    # diffusers' index_for_timestep: the second match when a timestep repeats.
    want = jnp.where(count > 1, 2, 1)
    idx = jnp.argmax(jnp.cumsum(matches, -1) == want[:, None], axis=-1)
    idx = jnp.where(count == 0, s.num_inference_steps - 1, idx)
    if s.kind in _EULER_KINDS:
        return x + z * s.sigmas[idx][expand]
    return s.coef["alpha"][idx][expand] * x + s.coef["sigma_vp"][idx][expand] * z


def ddim_inversion_step(schedule: Schedule, model_output: Array, i, sample: Array) -> Array:
    """One DDIM inversion step, from the noise level below ``timesteps[i]`` up to
    ``timesteps[i]`` (the inverse of ``step(schedule, ..., i, ...)`` with eps evaluated
    at ``timesteps[i]``).

    This is ``next_step`` of null-text inversion (Mokady et al. CVPR 2023,
    google/prompt-to-prompt null_text_w_ptp.ipynb): with ``t = timesteps[i]`` and
    ``s = t - num_train_timesteps // n`` (alpha_bar_s = final_alpha_cumprod when s < 0),
    ``x_t = sqrt(a_t) (x_s - sqrt(1 - a_s) eps) / sqrt(a_s) + sqrt(1 - a_t) eps``.
    The inversion loop runs ``i = n-1, n-2, ..., 0`` calling the model at
    ``timesteps[i]`` on the current (less noisy) latents.

    Args:
      schedule: a "ddim" schedule (``config.replace(kind="ddim")``).
      model_output: (B, ...) model output at ``timesteps[i]`` for ``sample``
        (eps; v/x0 predictions are converted with the noise level of ``sample``).
      i: step index (int or traced int32 scalar).
      sample: (B, ...) latents at the lower noise level.
    Returns: (B, ...) latents at ``timesteps[i]``, in ``sample``'s dtype.
    Raises: ValueError for a schedule that is not "ddim".
    """
    if schedule.kind != "ddim":
        raise ValueError(f"ddim_inversion_step needs a 'ddim' schedule, got "
                         f"{schedule.kind!r}; use make_schedule(config.replace(kind='ddim'), n)")
    cf = schedule.coef
    x = jnp.asarray(sample, jnp.float32)
    m = jnp.asarray(model_output, jnp.float32)
    sa, sb = cf["sqrt_alpha_prev"][i], cf["sqrt_beta_prev"][i]
    p = schedule.prediction_type
    if p == "epsilon":
        eps = m
        x0 = (x - sb * eps) / sa
    elif p == "sample":
        x0 = m
        eps = (x - sa * x0) / sb
    else:
        x0 = sa * x - sb * m
        eps = sa * m + sb * x
    out = cf["sqrt_alpha"][i] * x0 + cf["sqrt_beta"][i] * eps
    return out.astype(sample.dtype)
