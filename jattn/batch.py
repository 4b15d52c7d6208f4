"""Large batch generation: a resumable, sharded job over devices and processes.

``jattn batch JOB.jsonl --out-dir DIR`` (see :func:`run_job`). Each line of the job is one
request ``{"id": …, "prompt": …, "seed": …}`` with optional settings (``steps``,
``guidance_scale``, ``negative_prompt``, ``height``, ``width``, ``scheduler``) and an
optional ``"method": "p2p"`` with Prompt-to-Prompt arguments (``targets``, ``mode``,
``cross_replace_steps``, ``self_replace_steps``, ``equalize``, ``blend_words``, …): one such
request is one group ``[source, *targets]`` of images.

Pipeline of one process:

1. the whole file is read and validated before any work (:func:`read_job`): a mistake
   raises ``ValueError`` naming ``FILE:LINE``;
2. requests are split over processes deterministically (sorted by id, round-robin by
   process index, :func:`split`); each process skips the requests already present in its
   completed shards (resume);
3. its requests are bucketed by compiled structure (method, steps, size, CFG on/off,
   scheduler, group size, method arguments) and cut into calls of ``batch_size`` requests
   per device; the micro-batch axis is sharded over a ``("data",)`` mesh of the devices,
   whole groups per device, and each device runs the sampler and the decode over its
   micro-batches of ``micro_batch`` requests one after the other (``jax.lax.map`` inside
   ``jax.shard_map``); the last call is padded by repeating a request (outputs dropped);
4. outputs go to WebDataset tar shards ``shards/p{P:03d}-{N:06d}.tar`` (``{key}.png``,
   ``{key}.json``) written under a temporary name and renamed when complete, then the
   process's Parquet index ``index/p{P:03d}.parquet`` (request id → shard, key) is
   rewritten atomically; after every process is done, process 0 writes ``manifest.json``.

Resume: the done requests of a process are those of its completed shards (the index,
reconciled with shard files that a kill left unindexed, whose members are read back), so a
job killed at any moment and restarted with the same command ends with every request
exactly once.

Multi-process: every process runs the same command; ``jax.distributed.initialize`` joins
them (auto-detected on TPU/Slurm, or ``coordinator``/``num_processes``/``process_id``).
With ``mesh="global"`` (default) every call is one program over the devices of all
processes: the processes agree on the list of calls by exchanging their to-do lists
(``multihost_utils.process_allgather`` of a mask over the job), each supplies only its own rows
(``jax.make_array_from_process_local_data``) and reads back only its own images (the
output's addressable shards): no all-gather of images. ``mesh="local"``: each process runs
on its own devices. Either way each process writes only its own shards and index.

A process that dies is detected by JAX's coordination service (heartbeats,
``heartbeat_timeout``) and the other processes are then terminated, so no survivor waits
forever; a collective that loses its peer raises one clear error. Restart the same command
on every process to resume.

Determinism: a request's images depend only on the request and on ``micro_batch`` (the
shapes every kernel sees): the same whatever ``batch_size``, the number of devices or
processes, the order of the requests, the other requests of its call and the resume
history — so a restart may change ``batch_size``. XLA's CPU kernels round differently for
different batch shapes (≤ 4e-5 in the latents of the tiny test model), hence the fixed
micro-batch (recorded in ``job.json``; a restart with another value is refused).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import re
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from jattn.sampling import schedulers as _sch

__all__ = ["Request", "read_job", "split", "run_job", "BatchSettings", "JobResult",
           "REQUEST_KEYS", "P2P_KEYS", "METHODS"]

MAX_SEED = 2**32 - 1
SCHEDULERS = tuple(_sch.SCHEDULER_NAMES)  # kinds + presets, as the pipeline and the CLI
METHODS = ("generate", "p2p")
REQUEST_KEYS = ("id", "prompt", "seed", "steps", "guidance_scale", "negative_prompt",
                "height", "width", "scheduler", "method")
P2P_KEYS = ("targets", "mode", "cross_replace_steps", "self_replace_steps", "equalize",
            "blend_words", "subtract_words", "start_blend", "blend_threshold",
            "self_max_tokens")
JOB_FILE = "job.json"
MANIFEST = "manifest.json"
_TMP = ".jattn-tmp-"


# ---------------------------------------------------------------------- requests
@dataclasses.dataclass(frozen=True)
class Request:
    """One validated line of the job.

    Attributes:
      line: 1-based line number in the job file.
      id: the request id (str).
      raw: the line's JSON object as given.
      prompt, seed, steps, guidance_scale, negative_prompt, height, width, scheduler:
        settings (None = the job's default / the model's).
      method: "generate" or "p2p".
      args: the method's arguments (p2p: ``targets`` list and the rest), a JSON dict.
      key: the WebDataset key stem (the id made file-name safe, unique in the job).
    """

    line: int
    id: str
    raw: dict
    prompt: str
    seed: int
    steps: int | None
    guidance_scale: float | None
    negative_prompt: str
    height: int | None
    width: int | None
    scheduler: str | None
    method: str
    args: dict
    key: str = ""

    @property
    def members(self) -> int:
        return 1 + len(self.args["targets"]) if self.method == "p2p" else 1

    def prompts(self) -> list[str]:
        return [self.prompt] + list(self.args["targets"]) if self.method == "p2p" \
            else [self.prompt]


def _err(path, line: int, msg: str) -> ValueError:
    return ValueError(f"{path}:{line}: {msg}")


def _int(v, name, path, line, lo=None, hi=None):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or \
            (isinstance(v, float) and not v.is_integer()):
        raise _err(path, line, f'"{name}": {json.dumps(v)} is not a whole number')
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f"≥ {lo}"
        raise _err(path, line, f'"{name}": {v} is outside {rng}')
    return v


def _float(v, name, path, line, lo=None, hi=None):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _err(path, line, f'"{name}": {json.dumps(v)} is not a finite number')
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{lo:g}, {hi:g}]" if hi is not None else f"≥ {lo:g}"
        raise _err(path, line, f'"{name}": {v:g} is outside {rng}')
    return float(v)


def _str(v, name, path, line, allow_empty=True):
    if not isinstance(v, str):
        raise _err(path, line, f'"{name}": {json.dumps(v)[:60]} is not a string')
    if not allow_empty and not v.strip():
        raise _err(path, line, f'"{name}": empty')
    return v


def _words(v, name, path, line):
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(w, str) and w for w in v):
        raise _err(path, line, f'"{name}": give a list of words, e.g. ["cat"]')
    return list(v)


def _window(v, name, path, line):
    if isinstance(v, list) and len(v) == 2:
        a, b = (_float(x, name, path, line, 0.0, 1.0) for x in v)
        if a > b:
            raise _err(path, line, f'"{name}": start {a:g} after end {b:g}')
        return [a, b]
    return _float(v, name, path, line, 0.0, 1.0)


def _p2p_args(obj: dict, path, line) -> dict:
    from jattn.methods.p2p import MODES

    if "targets" not in obj:
        raise _err(path, line, '"method": "p2p" needs "targets": ["edited prompt", …]')
    t = obj["targets"]
    if isinstance(t, str):
        t = [t]
    if not isinstance(t, list) or not t:
        raise _err(path, line, '"targets": give a non-empty list of prompts')
    args: dict[str, Any] = {"targets": [_str(x, "targets", path, line, False) for x in t]}
    mode = obj.get("mode", "replace")
    if mode not in MODES:
        raise _err(path, line, f'"mode": {json.dumps(mode)}; choose one of {", ".join(MODES)}')
    args["mode"] = mode
    if "cross_replace_steps" in obj:
        args["cross_replace_steps"] = _window(obj["cross_replace_steps"],
                                              "cross_replace_steps", path, line)
    if "self_replace_steps" in obj:
        args["self_replace_steps"] = _window(obj["self_replace_steps"], "self_replace_steps",
                                             path, line)
    if "equalize" in obj:
        eq = obj["equalize"]
        if not isinstance(eq, dict) or not eq:
            raise _err(path, line, '"equalize": give {"word": weight, …}')
        args["equalize"] = {str(k): _float(v, f"equalize.{k}", path, line)
                            for k, v in eq.items()}
    elif mode == "reweight":
        raise _err(path, line, '"mode": "reweight" needs "equalize": {"word": weight}')
    for k in ("blend_words", "subtract_words"):
        if k in obj:
            args[k] = _words(obj[k], k, path, line)
    if "subtract_words" in args and "blend_words" not in args:
        raise _err(path, line, '"subtract_words" needs "blend_words" (it removes words from '
                               "the local-blend mask)")
    for k in ("start_blend", "blend_threshold"):
        if k in obj:
            args[k] = _float(obj[k], k, path, line, 0.0, 1.0)
    if "self_max_tokens" in obj:
        args["self_max_tokens"] = _int(obj["self_max_tokens"], "self_max_tokens", path, line,
                                       1)
    return args


def _parse_line(obj: Any, path, line: int) -> Request:
    if not isinstance(obj, dict):
        raise _err(path, line, f"expected a JSON object {{\"id\": …, \"prompt\": …, "
                               f"\"seed\": …}}, got {type(obj).__name__}")
    method = obj.get("method", "generate")
    if method not in METHODS:
        raise _err(path, line, f'unknown "method": {json.dumps(method)[:40]}; jattn batch '
                               f"knows {', '.join(METHODS)}")
    known = REQUEST_KEYS + (P2P_KEYS if method == "p2p" else ())
    unknown = [k for k in obj if k not in known]
    if unknown:
        extra = "" if method == "p2p" else ' (p2p arguments need "method": "p2p")' \
            if any(k in P2P_KEYS for k in unknown) else ""
        raise _err(path, line, f"unknown argument(s) {', '.join(map(repr, unknown))} for "
                               f"method {method!r}{extra}; known: {', '.join(known)}")
    for k in ("id", "prompt", "seed"):
        if k not in obj:
            raise _err(path, line, f'missing "{k}" (each line needs "id", "prompt", "seed")')
    rid = obj["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == "":
        raise _err(path, line, f'"id": {json.dumps(rid)[:40]}: give a non-empty string or '
                               "an integer")
    g = obj.get
    height = g("height")
    width = g("width")
    return Request(
        line=line, id=str(rid), raw=obj,
        prompt=_str(obj["prompt"], "prompt", path, line),
        seed=_int(obj["seed"], "seed", path, line, 0, MAX_SEED),
        steps=None if g("steps") is None else _int(g("steps"), "steps", path, line, 1, 1000),
        guidance_scale=None if g("guidance_scale") is None else _float(
            g("guidance_scale"), "guidance_scale", path, line, 0.0),
        negative_prompt=_str(g("negative_prompt", ""), "negative_prompt", path, line),
        height=None if height is None else _int(height, "height", path, line, 1),
        width=None if width is None else _int(width, "width", path, line, 1),
        scheduler=_scheduler(g("scheduler"), path, line),
        method=method,
        args=_p2p_args(obj, path, line) if method == "p2p" else {})


def _scheduler(v, path, line):
    if v is None:
        return None
    if v not in SCHEDULERS:
        raise _err(path, line, f'"scheduler": {json.dumps(v)[:40]}; choose one of '
                               f"{', '.join(SCHEDULERS)}")
    return v


def _safe_key(rid: str) -> str:
    k = re.sub(r"[^A-Za-z0-9_-]", "_", rid)[:100]
    return k or "_"


def read_job(path: str | os.PathLike) -> list[Request]:
    """Read and validate a JSONL job (every line) before any work.

    Blank lines and lines starting with ``#`` are skipped.

    Raises:
      FileNotFoundError: no such file.
      ValueError: ``FILE:LINE: …`` for the first malformed line (invalid JSON, not an
        object, missing/unknown keys, values of the wrong type or range, unknown method,
        duplicate id), or an empty job.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"job {str(path)!r}: no such file (a JSONL file, one request "
                                "per line).")
    requests: list[Request] = []
    seen: dict[str, int] = {}
    with open(p, "rb") as fh:
        for line, raw in enumerate(fh, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _err(path, line, f"not UTF-8 text ({e.reason} at byte {e.start})") \
                    from None
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise _err(path, line, f"invalid JSON ({e.msg} at column {e.colno})") from None
            req = _parse_line(obj, path, line)
            if req.id in seen:
                raise _err(path, line, f'duplicate "id": {req.id!r} (first on line '
                                       f"{seen[req.id]}); ids must be unique")
            seen[req.id] = line
            requests.append(req)
    if not requests:
        raise ValueError(f"job {str(path)!r}: no requests (one JSON object per line).")
    # WebDataset keys: the id made file-name safe; a clash gets the line number
    used: set[str] = set()
    out = []
    for r in requests:
        k = _safe_key(r.id)
        if k in used:
            k = f"{k}-L{r.line}"
        used.add(k)
        out.append(dataclasses.replace(r, key=k))
    return out


def split(requests: list[Request], num_processes: int, process_id: int) -> list[Request]:
    """The share of ``process_id``: requests sorted by id (as str), round-robin."""
    order = sorted(requests, key=lambda r: r.id)
    return order[process_id::num_processes]


# ---------------------------------------------------------------------- settings
@dataclasses.dataclass
class BatchSettings:
    """Job-wide settings (defaults for the requests, batching, output)."""

    out_dir: str
    batch_size: int = 4          # requests (groups) per device per compiled call; may
    #                              change between restarts (images do not depend on it)
    micro_batch: int = 1         # requests (groups) per kernel call (the compiled shapes;
    #                              images depend on it); batch_size is a multiple of it
    shard_size: int = 256        # requests per shard
    steps: int = 50
    guidance_scale: float = 7.5
    scheduler: str | None = None
    model: str | None = None
    dtype: str = "float32"
    num_devices: int | None = None   # local devices to use (default: all)
    mesh: str = "global"     # several processes: "global" = one program over every
    #                          process's devices; "local" = each process on its own
    progress: bool = True
    heartbeat_timeout: int = 100   # s: a dead process ends the others after this (JAX's default)


def _resolved(r: Request, s: BatchSettings, pipe) -> dict:
    """The settings a request runs with (defaults filled in)."""
    h = r.height or pipe.default_size
    w = r.width or pipe.default_size
    sched = r.scheduler or (s.scheduler if r.method == "generate" else None) or \
        ("ddim" if r.method == "p2p" else pipe.scheduler_config.kind)
    gs = s.guidance_scale if r.guidance_scale is None else r.guidance_scale
    return dict(steps=r.steps or s.steps, guidance_scale=gs, height=h, width=w,
                scheduler=sched)


def _bucket(r: Request, res: dict) -> tuple:
    """Requests with equal buckets run in one compiled program (their batch). The p2p
    arguments other than the prompts are shared by a batch's groups (one policy)."""
    method_args = json.dumps({k: v for k, v in r.args.items() if k != "targets"},
                             sort_keys=True)
    return (r.method, res["steps"], res["height"], res["width"], res["scheduler"],
            res["guidance_scale"], r.members, method_args)


# ---------------------------------------------------------------------- output state
def _shard_name(proc: int, n: int) -> str:
    return f"p{proc:03d}-{n:06d}.tar"


def _index_name(proc: int) -> str:
    return f"p{proc:03d}.parquet"


INDEX_COLUMNS = ("id", "key", "member", "shard", "process", "seed", "prompt", "line")


def _read_index(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    if not path.is_file():
        return []
    return pq.read_table(path).to_pylist()


def _write_index(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({c: [r[c] for r in rows] for c in INDEX_COLUMNS},
                     schema=pa.schema([("id", pa.string()), ("key", pa.string()),
                                       ("member", pa.int32()), ("shard", pa.string()),
                                       ("process", pa.int32()), ("seed", pa.int64()),
                                       ("prompt", pa.string()), ("line", pa.int64())]))
    tmp = path.parent / f"{_TMP}{path.name}"
    pq.write_table(table, tmp)
    _fsync(tmp)
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rows_of_shard(shard: Path, proc: int) -> list[dict]:
    """Index rows read back from a completed shard's ``.json`` members."""
    rows = []
    with tarfile.open(shard) as tf:
        for m in tf.getmembers():
            if m.name.endswith(".json"):
                meta = json.loads(tf.extractfile(m).read())
                rows.append(dict(id=meta["id"], key=meta["key"], member=meta["member"],
                                 shard=shard.name, process=proc, seed=meta["seed"],
                                 prompt=meta["prompt"], line=meta["line"]))
    return rows


def _job_fingerprint(requests: list[Request], s: BatchSettings, num_processes: int) -> dict:
    h = hashlib.sha256()
    for r in requests:
        h.update(json.dumps(r.raw, sort_keys=True).encode())
        h.update(b"\n")
    return {"requests_sha256": h.hexdigest(), "requests": len(requests),
            "micro_batch": s.micro_batch, "shard_size": s.shard_size, "steps": s.steps,
            "guidance_scale": s.guidance_scale, "scheduler": s.scheduler,
            "model": s.model, "dtype": s.dtype, "num_processes": num_processes}


def check_out_dir(out: Path, fingerprint: dict) -> bool:
    """Whether ``out`` holds an earlier run of this job (resume). Raises when it holds
    anything else: a file, another job, foreign files."""
    from jattn.io.outputs import OutputDirError

    if out.exists() and not out.is_dir():
        raise OutputDirError(f"--out-dir {str(out)!r} is a file, not a folder; choose a "
                             "folder path (it is created if missing).")
    if not out.is_dir() or not any(out.iterdir()):
        d = out.absolute()
        while not d.exists():
            d = d.parent
        if not d.is_dir() or not os.access(d, os.W_OK):
            raise OutputDirError(f"--out-dir {str(out)!r}: cannot create or write there; "
                                 "choose a writable folder.")
        return False
    job = out / JOB_FILE
    if not job.is_file():
        names = ", ".join(sorted(p.name for p in out.iterdir())[:4])
        raise OutputDirError(f"--out-dir {str(out)!r} is not empty (holds {names}) and holds "
                             f"no {JOB_FILE} of a jattn batch job; choose an empty or new "
                             "folder.")
    try:
        old = json.loads(job.read_text())
    except ValueError:
        raise OutputDirError(f"{job}: damaged; choose a new --out-dir.") from None
    diff = [k for k in fingerprint if old.get(k) != fingerprint[k]]
    if diff:
        raise OutputDirError(
            f"--out-dir {str(out)!r} holds another job (differs in {', '.join(diff)}); "
            "restart with the same job file and options to resume, or choose a new folder.")
    return True


# ---------------------------------------------------------------------- generation
def _local_mesh(num_devices: int | None):
    import jax

    devs = jax.local_devices()
    if num_devices is not None:
        if num_devices > len(devs):
            raise ValueError(f"--num-devices {num_devices}: this process has only "
                             f"{len(devs)} device(s).")
        devs = devs[:num_devices]
    return jax.sharding.Mesh(np.array(devs), ("data",))


def _global_mesh(num_devices: int | None):
    """``("data",)`` over every process's first ``num_devices`` local devices, process by
    process (process p's devices hold rows ``p·L … (p+1)·L − 1``)."""
    import jax

    nproc = jax.process_count()
    per = [[d for d in jax.devices() if d.process_index == p] for p in range(nproc)]
    n = min(len(d) for d in per) if num_devices is None else num_devices
    if n > min(len(d) for d in per):
        raise ValueError(f"--num-devices {n}: a process has only {min(len(d) for d in per)} "
                         "device(s).")
    return jax.sharding.Mesh(np.array([d for ds in per for d in ds[:n]]), ("data",)), n


# compiled programs and replicated params per (pipeline, mesh); a program's closure holds
# its pipeline, so an id() here is never reused by another pipeline while cached
_PROGRAMS: dict = {}


def _replicate(tree, mesh):
    """Every array leaf of ``tree`` as a global replicated array (same value on every
    process: the params, the schedule, the guidance scale)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    repl = NamedSharding(mesh, P())

    def put(a):
        # make_array_from_callback, not device_put: device_put to devices of several
        # processes first checks with a collective that every process passed the same value
        if isinstance(a, (np.ndarray, jax.Array, np.generic)):
            a = np.asarray(a)
            return jax.make_array_from_callback(a.shape, repl, lambda idx: a[idx])
        return a

    return jax.tree_util.tree_map(put, tree)


def _micro_inputs(pipe, res: dict, micro: list[Request]) -> dict:
    """Host inputs of one micro-batch (``len(micro)`` requests of one bucket, R rows =
    requests × members): ``cond``/``uncond`` ``(R, 77, D)`` float32 (each micro-batch's text
    is encoded alone: fixed shapes), ``keys`` ``(R, 2)`` uint32 key data, ``noise``
    ``(R, h, w, C)`` (p2p: numpy's ``default_rng(seed)`` per group, as
    :func:`jattn.methods.p2p.edit`; plain requests draw theirs from the key inside the
    program) and ``policy`` (p2p: the policy of the micro-batch's groups)."""
    from jattn.sampling import sampler as sampler_lib

    steps, height, width = res["steps"], res["height"], res["width"]
    m = micro[0].members
    prompts = [p for r in micro for p in r.prompts()]
    negs = [r.negative_prompt for r in micro for _ in range(m)]
    if getattr(pipe, "is_sdxl", False):
        cond, uncond = _sdxl_text(pipe, prompts, negs, res)
    else:
        cond = np.asarray(pipe.encode_prompts(prompts))
        uncond = np.asarray(pipe.encode_prompts(negs, name="negative_prompt")) \
            if res["guidance_scale"] > 1.0 else cond
    out = dict(cond=cond, uncond=uncond)
    if micro[0].method == "p2p":
        import jax

        from jattn.methods.p2p import p2p_policy

        f = pipe.vae_scale_factor
        h, w, c = height // f, width // f, pipe.unet_config.in_channels
        a = dict(micro[0].args)
        a.pop("targets")
        for k in ("cross_replace_steps", "self_replace_steps"):
            if isinstance(a.get(k), list):
                a[k] = tuple(a[k])
        g = len(micro)
        policy = p2p_policy(pipe, [r.prompt for r in micro] if g > 1 else micro[0].prompt,
                            [list(r.args["targets"]) for r in micro] if g > 1
                            else list(micro[0].args["targets"]),
                            num_steps=steps, height=height, width=width, **a)
        out["policy"] = jax.tree_util.tree_map(np.asarray, policy)
        lat = np.stack([np.random.default_rng(r.seed).standard_normal((c, h, w))
                        for r in micro]).astype(np.float32)
        out["noise"] = np.repeat(lat, m, axis=0).transpose(0, 2, 3, 1)
        seeds = [r.seed + i for r in micro for i in range(m)]
    else:
        seeds = [r.seed for r in micro]
    import jax

    out["keys"] = np.asarray(jax.random.key_data(
        sampler_lib.per_sample_keys(np.asarray(seeds, np.uint32))))
    return out


def _sdxl_text(pipe, prompts: list[str], negs: list[str], res: dict):
    """SDXL conditioning of one micro-batch as numpy pytrees ``{"context", "text_embeds",
    "time_ids"}`` (what :meth:`jattn.pipeline.Pipeline.generate` builds: default
    micro-conditioning ``(height, width, 0, 0, height, width)``; a request without a
    negative prompt gets zero negative conditioning when the checkpoint says
    ``force_zeros_for_empty_prompt``, as diffusers' ``negative_prompt=None``)."""
    import jax

    b = len(prompts)
    do_cfg = res["guidance_scale"] > 1.0
    tid = np.asarray(pipe.time_ids(b, res["height"], res["width"]))
    text = pipe.encode_prompts(prompts)
    cond = {"time_ids": tid, **jax.tree_util.tree_map(np.asarray, text)}
    if not do_cfg:
        return cond, cond
    un = pipe.encode_prompts(negs, name="negative_prompt")
    un = jax.tree_util.tree_map(np.asarray, un)
    if pipe.force_zeros_for_empty_prompt:
        empty = np.asarray([not n for n in negs])
        un = {k: np.where(empty.reshape((b,) + (1,) * (v.ndim - 1)), 0.0, v).astype(v.dtype)
              for k, v in un.items()}
    return cond, {"time_ids": tid, **un}


def _call_arrays(pipe, res: dict, rows: list[Request], micro_batch: int) -> dict:
    """The inputs of this process's rows of one call, stacked per micro-batch: every leaf
    gets a leading axis of ``len(rows) / micro_batch`` micro-batches (host numpy)."""
    import jax

    parts = [_micro_inputs(pipe, res, rows[i:i + micro_batch])
             for i in range(0, len(rows), micro_batch)]
    return jax.tree_util.tree_map(lambda *a: np.stack(a), *parts)


def _program(pipe, mesh, res: dict, p2p: bool):
    """The compiled program of one bucket's calls: ``(unet_params, vae_params, schedule,
    gs, items) -> uint8 images (K, R, H, W, 3)``; ``items`` stacked per micro-batch (K of
    them, sharded over the mesh's ``"data"`` axis). Each device runs the whole sampler and
    the decode over its micro-batches one after the other (``jax.lax.map`` inside
    ``jax.shard_map``), so every kernel sees the shapes of one micro-batch whatever
    ``--batch-size`` or the number of devices and processes: a request's images depend on
    the request (and the micro-batch size) only."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from jattn.sampling import sampler as sampler_lib

    do_cfg = res["guidance_scale"] > 1.0
    f = pipe.vae_scale_factor
    hwc = (res["height"] // f, res["width"] // f, pipe.unet_config.in_channels)
    key = (id(pipe), mesh, do_cfg, p2p, hwc)
    if key in _PROGRAMS:
        return _PROGRAMS[key]
    run = pipe.sampler_program(do_cfg)
    decode = pipe.decoder_program()

    def one(unet_p, vae_p, schedule, gs, item):
        keys = jax.random.wrap_key_data(item["keys"])
        x = item["noise"] if p2p else sampler_lib.initial_noise(keys, hwc)
        final, _ = run(unet_p, schedule, x * schedule.init_noise_sigma, item["cond"],
                       item["uncond"], gs, keys, item.get("policy"), None, None,
                       jnp.float32(0.0), None)
        return decode(vae_p, final)

    def per_device(unet_p, vae_p, schedule, gs, items):
        return jax.lax.map(lambda it: one(unet_p, vae_p, schedule, gs, it), items)

    fn = jax.jit(jax.shard_map(per_device, mesh=mesh,
                               in_specs=(P(), P(), P(), P(), P("data")),
                               out_specs=P("data")))
    _PROGRAMS[key] = fn
    return fn


def _sample_call(pipe, mesh, rows: list[Request], res: dict, micro_batch: int,
                 multiprocess: bool):
    """One call: this process's ``rows`` (one bucket; ``len(rows)`` = batch size × this
    process's devices) → uint8 images ``(len(rows), M, H, W, 3)``. Several processes
    (``multiprocess``): one program over the global mesh in lock step; each process supplies
    only its own rows (``jax.make_array_from_process_local_data``) and reads back only its
    own images (the output's addressable shards): no all-gather of images."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    m = rows[0].members
    items = _call_arrays(pipe, res, rows, micro_batch)
    sharding = NamedSharding(mesh, P("data"))
    if multiprocess:
        items = jax.tree_util.tree_map(
            lambda a: jax.make_array_from_process_local_data(sharding, a), items)
    else:
        items = jax.device_put(items, sharding)
    ck = ("params", id(pipe), mesh)
    if ck not in _PROGRAMS:
        _PROGRAMS[ck] = (_replicate(pipe.params["unet"], mesh),
                         _replicate(pipe.params["vae"], mesh))
    unet_p, vae_p = _PROGRAMS[ck]
    schedule = _replicate(pipe.schedule(res["steps"], res["scheduler"]), mesh)
    gs = _replicate(np.float32(res["guidance_scale"]), mesh)
    out = _program(pipe, mesh, res, rows[0].method == "p2p")(unet_p, vae_p, schedule, gs,
                                                              items)
    if multiprocess:
        shards = sorted(out.addressable_shards, key=lambda s: s.index[0].start or 0)
        images = np.concatenate([np.asarray(s.data) for s in shards])
    else:
        images = np.asarray(out)
    return images.reshape((len(rows), m) + images.shape[2:])


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class _sigint_deferred:
    """Hold SIGINT back (main thread) while a request's outputs or a shard's completion
    are written, so Ctrl-C never splits them; it is delivered right after."""

    def __enter__(self):
        import signal
        import threading

        self.on = threading.current_thread() is threading.main_thread()
        if self.on:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    def __exit__(self, *exc):
        import signal

        if self.on:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        return False


class _ShardWriter:
    """Sequential WebDataset shards of one process, each written to a temporary name and
    renamed when complete; after each rename the process's Parquet index is rewritten
    atomically (the index lists exactly the requests of completed shards)."""

    def __init__(self, out: Path, proc: int, shard_size: int, rows: list[dict], log):
        import webdataset  # noqa: F401 - imported here, not inside the timed writes

        self.out, self.proc, self.shard_size, self.log = out, proc, shard_size, log
        self.rows = rows
        existing = [int(p.stem.split("-")[1]) for p in (out / "shards").glob(f"p{proc:03d}-*.tar")]
        self.next = max(existing, default=-1) + 1
        self.tw = self.fh = self.tmp = None
        self.pending: list[dict] = []
        self.requests_in_shard = 0
        self.t0 = time.time()
        self.shards_written = 0
        self.bookkeeping = 0.0   # seconds in PNG encoding, tar writing, renames, index
        self.index_seconds = 0.0

    def _open(self):
        import webdataset as wds

        name = _shard_name(self.proc, self.next)
        self.tmp = self.out / "shards" / f"{_TMP}{name}"
        self.fh = open(self.tmp, "wb")
        self.tw = wds.TarWriter(self.fh, encoder=False, mtime=0.0)

    def add(self, req: Request, images: np.ndarray, meta: dict) -> None:
        t = time.perf_counter()
        with _sigint_deferred():   # a request's members land in one shard, all or none
            try:
                self._add(req, images, meta)
            finally:
                self.bookkeeping += time.perf_counter() - t

    def _add(self, req: Request, images: np.ndarray, meta: dict) -> None:
        if self.tw is None:
            self._open()
        name = _shard_name(self.proc, self.next)
        for i, im in enumerate(images):
            key = req.key if req.members == 1 else f"{req.key}-m{i}"
            prompt = req.prompts()[i]
            j = dict(id=req.id, key=key, member=i, prompt=prompt, line=req.line,
                     seed=req.seed, method=req.method, request=req.raw, shard=name,
                     process=self.proc, **meta)
            self.tw.write({"__key__": key, "png": _png(im),
                           "json": json.dumps(j, sort_keys=True).encode()})
            self.pending.append(dict(id=req.id, key=key, member=i, shard=name,
                                     process=self.proc, seed=req.seed, prompt=prompt,
                                     line=req.line))
        self.requests_in_shard += 1
        if self.requests_in_shard >= self.shard_size:
            self._close()

    def close(self) -> None:
        """Complete the current shard (if any): rename, then rewrite the index."""
        t = time.perf_counter()
        with _sigint_deferred():
            try:
                self._close()
            finally:
                self.bookkeeping += time.perf_counter() - t

    def _close(self) -> None:
        if self.tw is None:
            return
        self.tw.close()  # closes the file object too
        _fsync(self.tmp)
        name = _shard_name(self.proc, self.next)
        os.replace(self.tmp, self.out / "shards" / name)
        self.rows.extend(self.pending)
        t = time.perf_counter()
        _write_index(self.out / "index" / _index_name(self.proc), self.rows)
        self.index_seconds += time.perf_counter() - t
        dt = time.time() - self.t0
        n_img = len(self.pending)
        self.log(f"shard {name}: {self.requests_in_shard} requests, {n_img} images, "
                 f"{dt:.1f} s ({n_img / max(dt, 1e-9):.2f} images/s)")
        self.tw = self.fh = self.tmp = None
        self.pending = []
        self.requests_in_shard = 0
        self.next += 1
        self.shards_written += 1
        self.t0 = time.time()


@dataclasses.dataclass
class JobResult:
    """What one process did."""

    process: int
    requests_total: int        # this process's share
    requests_done_before: int  # skipped (resume)
    requests_run: int
    images: int
    seconds: float
    devices: int
    shards: int

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def _distributed(coordinator, num_processes, process_id, heartbeat_timeout=100):
    """Join the job's processes (``jax.distributed.initialize``); ``(index, count)``.

    ``heartbeat_timeout`` (s): a process that stops sending heartbeats (killed, crashed,
    host lost) is detected by the coordination service within this time and JAX then
    terminates every other process of the job ("…the JAX distributed service detected
    fatal errors…"), so the survivors of a killed job end instead of waiting forever;
    restart the same command on every process to resume."""
    import jax

    explicit = coordinator is not None or num_processes is not None or process_id is not None
    if explicit:
        if coordinator is None or num_processes is None or process_id is None:
            raise ValueError("--coordinator, --num-processes and --process-id go together "
                             "(or none of them: auto-detection on TPU/Slurm).")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id {process_id}: must be in [0, {num_processes}).")
        if num_processes > 1:
            jax.distributed.initialize(coordinator_address=coordinator,
                                       num_processes=num_processes, process_id=process_id,
                                       heartbeat_timeout_seconds=int(heartbeat_timeout))
    elif _cluster_detected():
        jax.distributed.initialize(heartbeat_timeout_seconds=int(heartbeat_timeout))
    return jax.process_index(), jax.process_count()


def _cluster_detected() -> bool:
    env = os.environ
    return any(k in env for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
                                  "MEGASCALE_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE",
                                  "JAX_COORDINATOR_ADDRESS")) and \
        int(env.get("SLURM_NTASKS", env.get("OMPI_COMM_WORLD_SIZE", "2")) or 2) > 1


def _allgather(what: str, a: np.ndarray) -> np.ndarray:
    """``a`` of every process, stacked ``(P, …)`` (``multihost_utils.process_allgather``:
    public JAX, a collective over the devices; it also synchronises the processes).

    Raises:
      RuntimeError: another process is gone (its connection closed); the completed shards
        are kept.
    """
    from jax.experimental import multihost_utils

    try:
        return np.asarray(multihost_utils.process_allgather(a))
    except Exception as e:  # noqa: BLE001 - a collective that lost a peer
        first = " ".join(str(e).split())[:160]
        raise RuntimeError(f"lost contact with another process of the job while exchanging "
                           f"{what} ({first}); the completed shards are kept: restart the "
                           "same command on every process to resume.") from None


def _allgather_json(what: str, value) -> list:
    """A JSON value of every process, in process order (bytes padded to the longest)."""
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = _allgather(what, np.asarray([data.size], np.int64)).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:data.size] = data
    rows = _allgather(what, buf)
    return [json.loads(bytes(rows[i, :int(n)])) for i, n in enumerate(sizes)]


def _global_schedule(requests, todo, buckets, resolved, proc, nproc, per_call):
    """The same list of calls on every process (the cross-process program runs in lock
    step): each process's to-do requests travel as a mask over the job's requests
    (``process_allgather``); per bucket, call k takes rows ``k·L … (k+1)·L − 1`` of every
    process's to-do list (L = ``per_call``), padded by repeating a request of the call
    (outputs dropped)."""
    pos = {r.id: i for i, r in enumerate(requests)}
    mask = np.zeros(len(requests), np.uint8)
    mask[[pos[r.id] for r in todo]] = 1
    masks = _allgather("the to-do lists", mask)
    todos = [[r for r, on in zip(requests, row) if on] for row in masks]
    keyed: dict[tuple, list[list[Request]]] = {}
    for p, rs in enumerate(todos):
        for r in sorted(rs, key=lambda r: r.id):
            keyed.setdefault(_bucket(r, resolved[r.id]), [[] for _ in range(nproc)])[p] \
                .append(r)
    calls = []
    for key in sorted(keyed, key=repr):
        lists = keyed[key]
        n_calls = max(math.ceil(len(x) / per_call) for x in lists)
        first = next(x[0] for x in lists if x)
        for k in range(n_calls):
            whole, mine = [], []
            for p, x in enumerate(lists):
                part = x[k * per_call:(k + 1) * per_call]
                if p == proc:
                    mine = part
                fill = part[-1] if part else first
                whole.extend(part + [fill] * (per_call - len(part)))
            calls.append((mine, whole))
    return calls


def _exit_at_once_when_distributed(e: BaseException) -> None:
    """A process of a multi-process job that stops on an error or Ctrl-C exits at once
    (exit code 130 for an interrupt, 2 for a reported error, else 1) instead of waiting in
    JAX's shutdown barrier (``jax.distributed``'s exit handler waits up to 300 s for the
    other processes, then aborts): the others see it gone within the heartbeat timeout and
    end too. Completed shards are kept; restart the same command on every process."""
    import atexit

    import jax

    from jattn.io import interrupt

    if not jax.distributed.is_initialized() or jax.process_count() < 2:
        return
    code = 130 if interrupt.is_interrupt(e) else 2 if isinstance(
        e, (ValueError, RuntimeError, OSError)) else 1

    def leave():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    atexit.register(leave)   # runs before jax.distributed's handler (registered earlier)


def run_job(job: str, settings: BatchSettings, *, coordinator: str | None = None,
            num_processes: int | None = None, process_id: int | None = None,
            pipe=None, log_stream=None) -> JobResult:
    """Run (or resume) a batch job in this process. See the module docstring.

    Raises:
      ValueError: a malformed job line (``FILE:LINE: …``), an unknown method or argument,
        a setting the model refuses (size, prompt over 77 tokens, naming the line), a
        distributed-flag mistake, ``batch_size`` not a multiple of ``micro_batch`` — all
        before anything is written.
      RuntimeError: several processes: another process of the job is gone (a collective
        lost its peer); completed shards are kept, restart the same command to resume.
      OutputDirError: ``--out-dir`` is a file, not writable, holds foreign files or
        another job.
    """
    try:
        return _run_job(job, settings, coordinator=coordinator, num_processes=num_processes,
                        process_id=process_id, pipe=pipe, log_stream=log_stream)
    except BaseException as e:
        _exit_at_once_when_distributed(e)
        raise


def _run_job(job: str, settings: BatchSettings, *, coordinator: str | None = None,
             num_processes: int | None = None, process_id: int | None = None,
             pipe=None, log_stream=None) -> JobResult:
    """:func:`run_job` itself (which adds the multi-process exit)."""
    from jattn.io import interrupt

    log_stream = log_stream or sys.stderr
    t_start = time.time()
    if settings.micro_batch < 1 or settings.batch_size % settings.micro_batch:
        raise ValueError(f"--batch-size {settings.batch_size}: must be a multiple of "
                         f"--micro-batch {settings.micro_batch} (micro-batches run one after "
                         "the other on each device).")
    requests = read_job(job)                       # 1. the whole file, before any work
    proc, nproc = _distributed(coordinator, num_processes, process_id,
                               settings.heartbeat_timeout)

    def log(msg):
        print(f"jattn batch [p{proc}]: {msg}", file=log_stream, flush=True)

    out = Path(settings.out_dir).expanduser()
    fp = _job_fingerprint(requests, settings, nproc)
    resuming = check_out_dir(out, fp)
    if pipe is None:
        import jattn

        if settings.dtype == "float16":
            import jax

            if jax.default_backend() == "cpu":
                raise ValueError("--dtype float16: XLA on CPU has no float16 matrix products; "
                                 "use --dtype bfloat16 or float32 on CPU.")
        pipe = jattn.load(settings.model, dtype=settings.dtype)
    use_global = nproc > 1 and settings.mesh == "global"
    if use_global:
        mesh, ndev = _global_mesh(settings.num_devices)   # ndev: this process's devices
    else:
        mesh = _local_mesh(settings.num_devices)
        ndev = mesh.size
    # model-dependent checks of every request (sizes, 77 tokens), still before any work
    resolved = {}
    for r in requests:
        res = _resolved(r, settings, pipe)
        try:
            pipe.check_size(res["height"], res["width"], settings.micro_batch * r.members)
            pipe.tokenize(r.prompts(), name="prompt")
            if r.negative_prompt:
                pipe.tokenize([r.negative_prompt], name="negative_prompt")
            pipe.schedule(res["steps"], res["scheduler"])
        except ValueError as e:
            raise _err(job, r.line, str(e)) from None
        resolved[r.id] = res
    mine = split(requests, nproc, proc)

    # 2. output folder and resume state
    for sub in ("shards", "index"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    job_file = out / JOB_FILE
    if not job_file.is_file():
        tmp = out / f"{_TMP}{JOB_FILE}.{proc}"
        tmp.write_text(json.dumps(fp, indent=2) + "\n")
        os.replace(tmp, job_file)
    for stale in (out / "shards").glob(f"{_TMP}p{proc:03d}-*"):
        stale.unlink()                              # a killed run's incomplete shard
    index_path = out / "index" / _index_name(proc)
    rows = _read_index(index_path)
    indexed = {r["shard"] for r in rows}
    shard_files = sorted((out / "shards").glob(f"p{proc:03d}-*.tar"))
    kept = [r for r in rows if (out / "shards" / r["shard"]).is_file()]
    recovered = [row for sf in shard_files if sf.name not in indexed
                 for row in _rows_of_shard(sf, proc)]
    if recovered or len(kept) != len(rows):
        rows = kept
        rows.extend(recovered)
        _write_index(index_path, rows)
    if recovered:
        log(f"recovered {len(recovered)} image(s) of shards completed before the index "
            "was updated")
    done_ids = {r["id"] for r in rows}
    todo = [r for r in mine if r.id not in done_ids]
    if resuming:
        log(f"resuming: {len(mine) - len(todo)} of {len(mine)} requests already done")

    # 3. buckets and batches (deterministic order)
    buckets: dict[tuple, list[Request]] = {}
    for r in sorted(todo, key=lambda r: r.id):
        buckets.setdefault(_bucket(r, resolved[r.id]), []).append(r)
    per_call = settings.batch_size * ndev     # requests per call on this process's devices
    batches = []   # (this process's requests, padded rows of the whole call or None)
    if use_global:
        batches = _global_schedule(requests, todo, buckets, resolved, proc, nproc, per_call)
    else:
        for key in sorted(buckets, key=repr):
            rs = buckets[key]
            for i in range(0, len(rs), per_call):
                b = rs[i:i + per_call]
                batches.append((b, None))
    total_images = sum(r.members for r in todo)

    writer = _ShardWriter(out, proc, settings.shard_size, rows, log)
    bar = None
    if settings.progress and proc == 0 and todo:
        from tqdm import tqdm

        bar = tqdm(total=total_images, unit="img", desc=f"jattn batch (p0, {ndev} dev)",
                   file=log_stream, dynamic_ncols=True)
    images_run = 0
    requests_run = 0
    t_work = time.time()
    try:
        for batch, whole in batches:
            if interrupt.requested():
                raise interrupt.Interrupted("jattn: interrupted by the user")
            n_real = len(batch)
            t0 = time.time()
            if whole is None:
                padded = batch + [batch[-1]] * (per_call - n_real)   # outputs dropped
            else:
                padded = whole[proc * per_call:(proc + 1) * per_call]
            imgs = _sample_call(pipe, mesh, padded, resolved[padded[0].id],
                                settings.micro_batch, whole is not None)
            dt = time.time() - t0
            for r, group in zip(batch, imgs[:n_real]):
                meta = dict(settings=resolved[r.id], timings=dict(
                    batch_seconds=round(dt, 4),
                    seconds_per_image=round(dt / (per_call * r.members), 5)),
                    batch_size=settings.batch_size, micro_batch=settings.micro_batch)
                writer.add(r, group, meta)
                images_run += r.members
                requests_run += 1
            if bar is not None and batch:
                bar.update(sum(r.members for r in batch))
    except BaseException:
        # keep what is complete: the requests already generated close their shard
        try:
            writer.close()
        finally:
            if bar is not None:
                bar.close()
        raise
    writer.close()
    if bar is not None:
        bar.close()
    secs = time.time() - t_work
    result = JobResult(process=proc, requests_total=len(mine),
                       requests_done_before=len(mine) - len(todo), requests_run=requests_run,
                       images=images_run, seconds=secs, devices=ndev,
                       shards=writer.shards_written)
    stats = dataclasses.asdict(result)
    stats["images_per_second"] = result.images_per_second
    stats["images_in_index"] = len(writer.rows)
    stats["requests_in_index"] = len({r["id"] for r in writer.rows})
    stats["output_seconds"] = writer.bookkeeping    # PNG + tar + fsync + rename + index
    stats["index_seconds"] = writer.index_seconds   # the Parquet index rewrites alone
    tmp = out / "index" / f"{_TMP}p{proc:03d}.json"
    tmp.write_text(json.dumps(stats, indent=2) + "\n")
    os.replace(tmp, out / "index" / f"p{proc:03d}.json")
    log(f"done: {requests_run} requests, {images_run} images in {secs:.1f} s, "
        f"{result.images_per_second:.3f} images/s, "
        f"{result.images_per_second / ndev:.3f} images/s per device ({ndev} device(s))")

    # 4. manifest (process 0, after every process)
    # every process's figures (a collective: also the barrier before the manifest)
    all_stats = _allgather_json("the final figures", stats) if nproc > 1 else [stats]
    if proc == 0:
        n_img = sum(s["images"] for s in all_stats)
        wall = time.time() - t_start
        manifest = dict(
            job=str(job), requests=len(requests),
            requests_done=sum(s["requests_in_index"] for s in all_stats),
            images=sum(s["images_in_index"] for s in all_stats),
            processes=nproc, devices=sum(s["devices"] for s in all_stats),
            settings=dict(fp, out_dir=str(out), model=settings.model or "bundled"),
            this_run=dict(images=n_img, seconds=max(s["seconds"] for s in all_stats),
                          images_per_second=sum(s["images_per_second"] for s in all_stats),
                          images_per_second_per_device=(
                              sum(s["images_per_second"] for s in all_stats)
                              / max(1, sum(s["devices"] for s in all_stats))),
                          wall_seconds=wall),
            per_process=all_stats,
            shards=sorted(p.name for p in (out / "shards").glob("p*.tar")),
            indexes=sorted(p.name for p in (out / "index").glob("p*.parquet")),
        )
        tmp = out / f"{_TMP}{MANIFEST}"
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, out / MANIFEST)
    return result
