"""Benchmark of ``jattn batch`` (issue 14) against a plain diffusers torch loop, one run.

Run:  python scripts/bench_batch.py [--requests 2000] [--steps 25] [--batch-size 8]
                                    [--micro-batch 1] [--torch-batch 8] [--tune]
                                    [--skip-torch] [--micro-cost]

* jattn: writes N requests of the bundled model (prompts of its world, seeds 0..N-1,
  CFG 7.5, the checkpoint's scheduler) to a JSONL job and runs ``jattn batch`` in a
  subprocess; images/s from its manifest (``this_run``: first compile included) and
  steady images/s (after the first shard); RSS of the process sampled every 0.2 s,
  reported when 10 % and 100 % of the requests are in completed shards; the time spent
  in output bookkeeping (PNG encoding, tar shards, fsync + atomic renames, the Parquet
  index rewritten after each shard = what resume needs) and in the index rewrites alone.
* diffusers: ``StableDiffusionPipeline.from_pretrained(jattn/assets/bundled)`` (same
  weights, same scheduler config), a loop over the same prompts in batches, images as
  numpy (``output_type="np"``), no files written.
* ``--tune``: before the timed runs, each framework times a few batches at sizes 1, 4,
  8, 16 and keeps its fastest (images/s) for the timed run.

* ``--micro-cost``: the cost of the fixed micro-batch (what makes images independent of
  ``--batch-size``): the same job at ``--micro-batch 1`` and at ``--micro-batch`` =
  ``--batch-size`` (one kernel call per device per call), steady images/s and CPU s/image.

Prints one table; the ratio is jattn images/s ÷ diffusers images/s in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prompts(n: int) -> list[str]:
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    shapes = ["circle", "square", "triangle", "star", "cross", "heart"]
    where = ["on the left", "on the right", "at the top", "at the bottom", "in the centre"]
    sizes = ["small", "big", ""]
    out = []
    i = 0
    while len(out) < n:
        c, s, w, z = (colours[i % 8], shapes[(i // 8) % 6], where[(i // 48) % 5],
                      sizes[(i // 240) % 3])
        out.append(" ".join(x for x in ["a", z, c, s, w] if x))
        i += 1
    return out


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def run_jattn(n: int, steps: int, batch_size: int, shard_size: int, work: Path,
              micro_batch: int = 1) -> dict:
    job = work / f"job-{n}-{batch_size}.jsonl"
    job.write_text("".join(json.dumps({"id": f"{i:06d}", "prompt": p, "seed": i}) + "\n"
                           for i, p in enumerate(prompts(n))))
    out = work / f"out-{n}-{batch_size}-{micro_batch}"
    cmd = [sys.executable, "-m", "jattn.cli", "batch", str(job), "--out-dir", str(out),
           "--steps", str(steps), "--batch-size", str(batch_size), "--micro-batch",
           str(micro_batch), "--shard-size", str(shard_size), "--no-progress"]
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples = []        # (time, rss MB, requests in completed shards)
    cpu = cpu_first = float("nan")
    first_shard_t = None

    def done_requests() -> int:
        return len(list((out / "shards").glob("p*.tar"))) * shard_size if out.exists() else 0

    while p.poll() is None:
        d = min(done_requests(), n)
        if d and first_shard_t is None:
            first_shard_t = (time.time(), d)
            cpu_first = cpu_s(p.pid)
        samples.append((time.time() - t0, rss_mb(p.pid), d))
        c = cpu_s(p.pid)
        if c == c:
            cpu = c
        time.sleep(0.2)
    _, err = p.communicate()
    if p.returncode != 0:
        raise SystemExit(f"jattn batch failed:\n{err[-3000:]}")
    wall = time.time() - t0
    m = json.loads((out / "manifest.json").read_text())
    st = m["per_process"][0]
    at10 = next((r for _, r, d in samples if d >= 0.1 * n), float("nan"))
    at100 = [r for _, r, _ in samples if r == r][-1]
    steady = steady_cpu = float("nan")
    if first_shard_t is not None:
        steady_cpu = (cpu - cpu_first) / max(n - first_shard_t[1], 1)
        t1, d1 = first_shard_t
        end = t0 + st["seconds"] + (wall - st["seconds"])  # ~ process end
        steady = (n - d1) / max(end - t1, 1e-9)
    return dict(images=m["images"], wall=wall, seconds=st["seconds"],
                ips=st["images_per_second"], steady_ips=steady, rss10=at10, rss100=at100,
                rss_max=max(r for _, r, _ in samples), output_s=st["output_seconds"],
                index_s=st["index_seconds"], shards=len(m["shards"]), cpu=cpu,
                steady_cpu=steady_cpu)


def diffusers_pipe(threads: int):
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(threads)
    return StableDiffusionPipeline.from_pretrained(
        str(ROOT / "jattn" / "assets" / "bundled"), safety_checker=None,
        requires_safety_checker=False)


def run_torch(pipe, ps: list[str], steps: int, batch: int) -> dict:
    import torch

    pipe.set_progress_bar_config(disable=True)
    t0 = time.time()
    c0 = time.process_time()
    n = 0
    with torch.inference_mode():
        for i in range(0, len(ps), batch):
            chunk = ps[i:i + batch]
            g = [torch.Generator().manual_seed(i + j) for j in range(len(chunk))]
            out = pipe(chunk, num_inference_steps=steps, guidance_scale=7.5, generator=g,
                       output_type="np").images
            n += len(out)
    dt = time.time() - t0
    return dict(images=n, seconds=dt, ips=n / dt, cpu=time.process_time() - c0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=8, help="jattn requests per device")
    ap.add_argument("--micro-batch", type=int, default=1,
                    help="jattn requests per kernel call (a divisor of --batch-size)")
    ap.add_argument("--micro-cost", action="store_true",
                    help="only jattn: --micro-batch 1 vs --micro-batch = --batch-size")
    ap.add_argument("--torch-batch", type=int, default=8)
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads (1: on a machine shared with other jobs, "
                         "2 OpenMP threads spin at barriers and run ~10x slower)")
    ap.add_argument("--shard-size", type=int, default=0, help="default: requests / 20")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--skip-torch", action="store_true")
    a = ap.parse_args()
    n = a.requests
    shard = a.shard_size or max(1, n // 20)
    work = Path(tempfile.mkdtemp(prefix="bench_batch-"))
    if a.micro_cost:
        res = {}
        for mb in (1, a.batch_size):
            r = run_jattn(n, a.steps, a.batch_size, shard, work, mb)
            res[mb] = r
            print(f"jattn batch {a.batch_size}, micro-batch {mb}: {r['images']} images in "
                  f"{r['seconds']:.1f} s: {r['ips']:.3f} images/s incl. compile, "
                  f"{r['steady_ips']:.3f} after the first shard; {r['steady_cpu']:.3f} CPU "
                  "s/image after the first shard", flush=True)
        one, full = res[1], res[a.batch_size]
        print(f"micro-batch 1 / micro-batch {a.batch_size}: images/s (steady) "
              f"{one['steady_ips'] / full['steady_ips']:.3f}, by CPU s/image "
              f"{full['steady_cpu'] / one['steady_cpu']:.3f}")
        return
    print(f"work dir {work}; {n} requests, {a.steps} steps, CFG 7.5, bundled model")
    tpipe = None if a.skip_torch else diffusers_pipe(a.torch_threads)
    jb, tb = a.batch_size, a.torch_batch
    if a.tune:
        best = {}
        for b in (1, 4, 8, 16):
            r = run_jattn(2 * b + b, a.steps, b, b, work)   # 3 batches; first = compile
            best[b] = r["steady_ips"]
            print(f"  tune jattn batch {b}: {r['steady_ips']:.3f} images/s (steady)")
        jb = max(best, key=lambda k: best[k] if best[k] == best[k] else -1)
        if tpipe is not None:
            tbest = {}
            for b in (1, 4, 8, 16):
                run_torch(tpipe, prompts(b), a.steps, b)        # warm-up
                tbest[b] = run_torch(tpipe, prompts(2 * b), a.steps, b)["ips"]
                print(f"  tune diffusers batch {b}: {tbest[b]:.3f} images/s")
            tb = max(tbest, key=tbest.get)
    j = run_jattn(n, a.steps, jb, shard, work, a.micro_batch)
    print(f"jattn batch   (batch {jb}/device, micro-batch {a.micro_batch}, 1 device): "
          f"{j['images']} images in "
          f"{j['seconds']:.1f} s (process wall {j['wall']:.1f} s): {j['ips']:.3f} images/s "
          f"incl. compile, {j['steady_ips']:.3f} images/s after the first shard; "
          f"{j['cpu'] / j['images']:.2f} CPU s/image incl. load + compile, "
          f"{j['steady_cpu']:.3f} after the first shard")
    print(f"  RSS at 10 %: {j['rss10']:.0f} MB, at 100 %: {j['rss100']:.0f} MB "
          f"(max {j['rss_max']:.0f} MB)")
    print(f"  output bookkeeping (PNG + tar + fsync/rename + index): {j['output_s']:.2f} s "
          f"= {100 * j['output_s'] / j['seconds']:.2f} % of the job; Parquet index "
          f"rewrites alone {j['index_s']:.3f} s over {j['shards']} shards")
    if tpipe is not None:
        run_torch(tpipe, prompts(min(tb, n)), a.steps, tb)            # warm-up
        t = run_torch(tpipe, prompts(n), a.steps, tb)
        print(f"diffusers loop (batch {tb}, {a.torch_threads} thread(s)): {t['images']} "
              f"images in {t['seconds']:.1f} s: {t['ips']:.3f} images/s; "
              f"{t['cpu'] / t['images']:.2f} CPU s/image")
        print(f"ratio jattn / diffusers (images/s): {j['ips'] / t['ips']:.2f} (incl. "
              f"compile), {j['steady_ips'] / t['ips']:.2f} (steady); by CPU time per image "
              f"(robust on a shared machine): {t['cpu'] / t['images'] / j['steady_cpu']:.2f} "
              "(steady)")


if __name__ == "__main__":
    main()
