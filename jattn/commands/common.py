"""What every ``jattn`` command shares: the argument parser with one-line errors, argument
types with ranges, the model/output/sampling options, the pipeline cache, seeds, grids.

A method's command lives in its own module of this package with a ``register(sub)``
function that adds its subparser (``sub.add_parser(...)``, ``set_defaults(func=...)``);
``jattn/cli.py`` calls every module's ``register``. The command function writes through a
:class:`jattn.io.outputs.OutputDir` (``reserve`` the names before loading the model, then
``images``/``image``/``write``, then ``finish(result)``), and raises ``ValueError`` with the
argument's name for user mistakes; ``tests/test_bad_input.py`` holds one row per mistake.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from pathlib import Path

import numpy as np

from jattn.io.outputs import OutputDir

__all__ = ["Parser", "int_type", "float_type", "STEPS", "SEED", "SIZE", "GUIDANCE",
           "FRACTION", "add_model_args", "add_out_args", "add_sampling_args", "load_pipeline",
           "arguments", "save_grid", "write_outputs", "seeds_for", "load_npy", "read_image", "SCHEDULERS",
           "MAX_SEED", "OutputDir", "renamed_errors", "need_values", "add_sdxl_args",
           "sdxl_kwargs", "SDXL_FLAGS", "refuse_sdxl"]

SCHEDULERS = ["ddim", "ddpm", "euler", "euler-ancestral", "euler-karras", "dpm++2m",
              "dpm++2m-karras"]  # = jattn.sampling.schedulers.SCHEDULER_NAMES
MAX_SEED = 2**32 - 1


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``jattn CMD: error: …``) and exit code 2."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def int_type(lo: int | None = None, hi: int | None = None, what: str = "a whole number"):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f"[{lo}, {hi}]" if hi is not None else f"≥ {lo}"
            raise argparse.ArgumentTypeError(f"{v} is outside {rng}")
        return v
    return parse


def float_type(lo: float | None = None, hi: float | None = None):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f"[{lo:g}, {hi:g}]" if hi is not None else f"≥ {lo:g}"
            raise argparse.ArgumentTypeError(f"{v:g} is outside {rng}")
        return v
    return parse


STEPS = int_type(1, 1000)
SEED = int_type(0, MAX_SEED, "a seed (whole number)")
SIZE = int_type(1, None, "a size in pixels")
GUIDANCE = float_type(0.0)
FRACTION = float_type(0.0, 1.0)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="diffusers-layout folder or Hugging Face hub id (default: bundled model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="parameter/compute dtype (float16: GPU/TPU only, XLA on CPU has no "
                        "float16 matrix products)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept .bin/.ckpt pickle weights (unsafe; refused by default)")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of errors (also JATTN_DEBUG=1)")


def add_out_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-dir", required=True,
                   help="output folder (must be empty or new, see --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="use a non-empty --out-dir: replace jattn's own earlier outputs there "
                        "(the files its result.json lists); other files are never touched")


def add_sampling_args(p: argparse.ArgumentParser, seed: bool = True) -> None:
    """--steps, --guidance-scale, [--seed], --out-dir, --overwrite (the method commands)."""
    p.add_argument("--steps", type=STEPS, default=50, help="denoising steps (1-1000)")
    p.add_argument("--guidance-scale", type=GUIDANCE, default=7.5,
                   help="CFG scale ≥ 0 (CFG runs when > 1)")
    if seed:
        p.add_argument("--seed", type=SEED, default=0, help=f"in [0, {MAX_SEED}]")
    add_out_args(p)


# generate() keyword -> command-line flag, for the SDXL-only arguments
SDXL_FLAGS = {
    "prompt_2": "--prompt-2", "negative_prompt_2": "--negative-prompt-2",
    "original_size": "--original-size", "crops_coords_top_left": "--crops-coords-top-left",
    "target_size": "--target-size", "negative_original_size": "--negative-original-size",
    "negative_crops_coords_top_left": "--negative-crops-coords-top-left",
    "negative_target_size": "--negative-target-size",
}


def add_sdxl_args(p: argparse.ArgumentParser, *, prompts: bool = True,
                  negative: bool = True) -> None:
    """SDXL's conditioning options (an error naming the flag on SD1/SD2 models, see
    :func:`sdxl_kwargs`): ``--prompt-2`` (repeat, one per ``--prompt``, or one for all),
    ``--negative-prompt-2``, and the micro-conditioning ``--original-size H W``,
    ``--crops-coords-top-left Y X``, ``--target-size H W`` (and with ``negative``, their
    ``--negative-*`` counterparts)."""
    g = p.add_argument_group("SDXL conditioning (SDXL models only)")
    if prompts:
        g.add_argument("--prompt-2", action="append", default=None,
                       help="prompt of SDXL's second text encoder (default: --prompt); "
                            "repeat once per --prompt, or give one for all")
        if negative:
            g.add_argument("--negative-prompt-2", default=None,
                           help="negative prompt of the second text encoder (default: "
                                "--negative-prompt)")
    pair = int_type(1, None, "a size in pixels")
    g.add_argument("--original-size", nargs=2, type=pair, metavar=("H", "W"), default=None,
                   help="micro-conditioning: the size the image 'was' before resizing "
                        "(default: the output size)")
    g.add_argument("--crops-coords-top-left", nargs=2, type=int_type(0, None),
                   metavar=("Y", "X"), default=None,
                   help="micro-conditioning: crop offset (default 0 0 = centred, uncropped)")
    g.add_argument("--target-size", nargs=2, type=pair, metavar=("H", "W"), default=None,
                   help="micro-conditioning: target size (default: the output size)")
    if negative:
        g.add_argument("--negative-original-size", nargs=2, type=pair, metavar=("H", "W"),
                       default=None, help="micro-conditioning of the negative rows "
                       "(default: --original-size)")
        g.add_argument("--negative-crops-coords-top-left", nargs=2, type=int_type(0, None),
                       metavar=("Y", "X"), default=None,
                       help="(default: --crops-coords-top-left)")
        g.add_argument("--negative-target-size", nargs=2, type=pair, metavar=("H", "W"),
                       default=None, help="(default: --target-size)")


def sdxl_kwargs(args, pipe, n_prompts: int | None = None, what: str = "--prompt") -> dict:
    """The SDXL keyword arguments of ``Pipeline.generate`` from the options of
    :func:`add_sdxl_args` (only those given).

    Raises:
      ValueError: an SDXL option with an SD1/SD2 model (naming the flag and the fix), or
        ``--prompt-2`` given neither once nor once per ``--prompt`` (``what``: the
        command's rows, e.g. "prompt (--prompt and each --target)").
    """
    out = {}
    for key, flag in SDXL_FLAGS.items():
        v = getattr(args, key, None)
        if v is None:
            continue
        if not pipe.is_sdxl:
            raise ValueError(f"{flag}: this model ({pipe.source}) has one text encoder and no "
                             f"micro-conditioning (SD1/SD2); {flag} applies to SDXL models "
                             "only. Fix: leave it out, or pass --model with an SDXL checkpoint.")
        if key == "prompt_2" and n_prompts is not None:
            v = list(v)
            if len(v) == 1:
                v = v * n_prompts
            if len(v) != n_prompts:
                raise ValueError(f"--prompt-2: given {len(v)} times for {n_prompts} {what}; "
                                 f"give it once (for all prompts) or once per {what}.")
        out[key] = tuple(v) if isinstance(v, list) and key != "prompt_2" else v
    return out


def refuse_sdxl(xl: dict, why: str) -> None:
    """One error naming the first SDXL option of ``xl`` (from :func:`sdxl_kwargs`) where it
    has no meaning, e.g. ``why="with --image the inversion fixes the source's conditioning
    (its prompt and the image's size)"``.

    Raises:
      ValueError: ``xl`` not empty.
    """
    if xl:
        flag = SDXL_FLAGS[next(iter(xl))]
        raise ValueError(f"{flag}: {why}; leave {flag} out.")


_PIPES: dict = {}


def load_pipeline(args):
    """The pipeline of ``--model``/``--dtype`` (loaded once per process)."""
    import jattn

    key = (args.model, args.dtype, args.allow_pickle)
    if key not in _PIPES:
        if args.dtype == "float16":
            import jax

            if jax.default_backend() == "cpu":
                raise ValueError("--dtype float16: XLA on CPU has no float16 matrix products; "
                                 "use --dtype bfloat16 (same memory) or float32 on CPU.")
        _PIPES[key] = jattn.load(args.model, dtype=args.dtype, allow_pickle=args.allow_pickle)
    return _PIPES[key]


def arguments(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("func", "debug")}


def save_grid(out: OutputDir, images, labels, name: str = "grid.png") -> None:
    from jattn.policy.analysis import grid

    out.image(name, grid(list(images), rows=1, cols=len(images), labels=labels))


def seeds_for(args, n: int) -> list[int]:
    from jattn.io.checks import seed_list

    return seed_list(args.seed, n, "--seed")


def load_npy(path: str, arg: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{arg} {path!r}: no such file.")
    try:
        return np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{arg} {path!r}: not a readable .npy array ({e}); save one with "
                         "numpy.save(path, array.astype(numpy.float32)).") from None


def read_image(pipe, path: str, arg: str = "--image"):
    from jattn.io.images import load_image

    return load_image(path, pipe.default_size, arg=arg)


def write_outputs(out: OutputDir, images, labels: list[str], result: dict) -> list[Path]:
    """The usual ending of a command: ``000.png, 001.png, …``, ``grid.png`` when there are
    several images (labelled), ``result.json``; one ``path<TAB>label`` line per image."""
    paths = out.images(images)
    if len(images) > 1:
        save_grid(out, images, labels)
    out.finish(result)
    for p, label in zip(paths, labels):
        print(f"{p}\t{label}")
    return paths



@contextlib.contextmanager
def renamed_errors(names: dict[str, str]):
    """Re-raise a ``ValueError`` of the API with its argument names replaced by the
    command's options (``{"boxes": "--box"}``): one message naming what the user typed."""
    try:
        yield
    except ValueError as e:
        msg = str(e)
        for api, cli in names.items():
            msg = msg.replace(api, cli)
        raise ValueError(msg) from None


def need_values(values, arg: str, what: str) -> list:
    """``values`` as a list, or a ``ValueError`` naming ``arg`` when there is none."""
    out = list(values or [])
    if not out:
        raise ValueError(f"{arg}: {what}")
    return out
