"""``jattn batch`` (issue 14): validation before work, bit-identical outputs over device
and process counts and batch sizes, exactly-once after kill -9 (of one process of a
single- or multi-process job) and restart.

Every run is a subprocess with 4 virtual CPU devices (``--xla_force_host_platform_device_
count=4``): XLA's CPU client compiles slightly different kernels for different virtual
device counts (measured: 2.4e-6 in one UNet call of the tiny model), so the reference
"single-device run" is ``--num-devices 1`` on the same client configuration.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from jattn.cli import main

JOB = [
    {"id": "plain-1", "prompt": "a red circle", "seed": 1},
    {"id": "plain-2", "prompt": "a blue square", "seed": 2, "negative_prompt": "green"},
    {"id": "plain-3", "prompt": "a green star", "seed": 3},
    {"id": "edit-1", "prompt": "a red circle", "seed": 5, "method": "p2p",
     "targets": ["a blue circle"]},
    {"id": "edit-2", "prompt": "a green square", "seed": 6, "method": "p2p",
     "targets": ["a green star"]},
    {"id": "plain-4", "prompt": "a big dot", "seed": 4, "guidance_scale": 3.0},
]
IMAGES = sum(1 + len(r.get("targets", [])) for r in JOB)


def _env():
    flags = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
    return dict(os.environ, XLA_FLAGS=flags, JATTN_KEEP_XLA_FLAGS="", PYTHONUNBUFFERED="1")


def _cmd(job, out, tiny, *extra):
    return [sys.executable, "-m", "jattn.cli", "batch", str(job), "--out-dir", str(out),
            "--model", str(tiny), "--steps", "2", "--batch-size", "1", "--shard-size", "1",
            "--no-progress", *extra]


def _write_job(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _outputs(out: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """Every sample of every completed shard; asserts no key appears twice."""
    from PIL import Image

    seen: dict[str, tuple[np.ndarray, dict]] = {}
    for shard in sorted((out / "shards").glob("p*.tar")):
        with tarfile.open(shard) as tf:
            files = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        for name, data in files.items():
            if not name.endswith(".json"):
                continue
            key = name[:-5]
            assert key not in seen, f"duplicate {key} in {shard.name}"
            img = np.asarray(Image.open(io.BytesIO(files[key + ".png"])))
            seen[key] = (img, json.loads(data))
    return seen


def _index_rows(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return [r for p in sorted((out / "index").glob("p*.parquet"))
            for r in pq.read_table(p).to_pylist()]


def _check_complete(out: Path):
    got = _outputs(out)
    assert len(got) == IMAGES
    assert {m["id"] for _, m in got.values()} == {r["id"] for r in JOB}
    rows = _index_rows(out)
    assert sorted(r["key"] for r in rows) == sorted(got)          # index ↔ shards, once each
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"] == IMAGES and manifest["requests_done"] == len(JOB)
    assert not [p for p in out.rglob("*") if p.name.startswith(".jattn-tmp-")]
    return got


def _same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k][0], b[k][0], err_msg=k)   # bit for bit
        assert a[k][1]["seed"] == b[k][1]["seed"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(tiny_sd_dir, tmp_path_factory):
    """The single-device run (``--num-devices 1 --batch-size 1``) of ``JOB``, started in
    the background (it runs alongside a test's own jobs); call it for its outputs."""
    d = tmp_path_factory.mktemp("batch_ref")
    job = _write_job(d / "job.jsonl", JOB)
    p = subprocess.Popen(_cmd(job, d / "ref", tiny_sd_dir, "--num-devices", "1"), env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = {}

    def outputs():
        if not done:
            log, _ = p.communicate(timeout=900)
            assert p.returncode == 0, log[-3000:]
            done["out"] = _check_complete(d / "ref")
        return done["out"]

    yield outputs
    if p.poll() is None:
        p.kill()
        p.communicate()


def test_devices_processes_batch_sizes_and_kill9_resume_are_bit_identical(
        tiny_sd_dir, tmp_path, reference):
    job = _write_job(tmp_path / "job.jsonl", JOB)
    env = _env()
    # at once: the 2-process job (one program over both processes' devices, inputs by
    # jax.make_array_from_process_local_data; batch size 2) and a 4-device job (batch size
    # 1) that is killed with SIGKILL after its first completed shard and restarted with
    # --batch-size 2: the union of the outputs of its two batch sizes must be the
    # reference, bit for bit (micro-batches of 1 request whatever the batch size)
    pipe = dict(env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    port = _free_port()
    procs = [subprocess.Popen(_cmd(job, tmp_path / "mp", tiny_sd_dir, "--num-devices", "2",
                                   "--batch-size", "2", "--coordinator",
                                   f"127.0.0.1:{port}", "--num-processes", "2",
                                   "--process-id", str(i)), **pipe) for i in range(2)]
    out = tmp_path / "k"
    cmd = _cmd(job, out, tiny_sd_dir, "--num-devices", "4")
    k = subprocess.Popen(cmd, **pipe)
    t0 = time.time()
    while not list((out / "shards").glob("p000-*.tar")) and k.poll() is None \
            and time.time() - t0 < 900:
        time.sleep(0.05)
    assert k.poll() is None, "the job ended before it could be killed"
    k.send_signal(signal.SIGKILL)
    k.communicate()
    assert not (out / "manifest.json").exists()
    partial = _outputs(out)
    assert 0 < len(partial) < IMAGES
    cmd2 = cmd + ["--batch-size", "2"]               # the same job, another batch size
    restart = subprocess.Popen(cmd2, **pipe)
    for p in [*procs, restart]:
        log, _ = p.communicate(timeout=900)
        assert p.returncode == 0, log[-3000:]
        if p is restart:
            assert "resuming" in log, log[-2000:]
    reference = reference()
    multi = _check_complete(tmp_path / "mp")
    # each process wrote only its own shards and index
    for i in range(2):
        assert {m["process"] for k_, (_, m) in multi.items()
                if m["shard"].startswith(f"p{i:03d}")} == {i}
    assert len(list((tmp_path / "mp" / "index").glob("p*.parquet"))) == 2
    _same(reference, multi)
    resumed = _check_complete(out)
    _same(reference, resumed)
    for key in partial:                               # what was done was not redone
        np.testing.assert_array_equal(partial[key][0], resumed[key][0])
    # a third run (yet another batch size) finds everything done and generates nothing
    r = subprocess.run(cmd + ["--batch-size", "4"], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "done: 0 requests" in r.stderr, r.stderr[-2000:]
    _same(reference, _check_complete(out))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill9", "sigint"])
def test_kill9_or_sigint_of_one_process_then_restart_of_both_is_exactly_once(
        sig, tiny_sd_dir, tmp_path, reference):
    """2 ``jax.distributed`` processes; process 1 gets SIGKILL (or Ctrl-C: it exits at once
    with 130) after its first shard: the other ends by itself (heartbeat timeout or a
    collective that lost its peer, no hang), the same command restarted on both processes
    completes the job, every request once, bit-identical to one device."""
    job = _write_job(tmp_path / "job.jsonl", JOB)
    pipe = dict(env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = tmp_path / "mp"
    port = _free_port()
    cmds = [_cmd(job, out, tiny_sd_dir, "--num-devices", "1", "--coordinator",
                 f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
                 "--heartbeat-timeout", "10") for i in range(2)]
    procs = [subprocess.Popen(c, **pipe) for c in cmds]
    t0 = time.time()
    while not list((out / "shards").glob("p001-*.tar")) and procs[1].poll() is None \
            and time.time() - t0 < 900:
        time.sleep(0.05)
    assert procs[1].poll() is None, "process 1 ended before it could be killed"
    procs[1].send_signal(sig)
    log1, _ = procs[1].communicate(timeout=120)
    if sig == signal.SIGINT:
        assert procs[1].returncode == 130 and "interrupted" in log1, log1[-2000:]
    t_kill = time.time()
    log0, _ = procs[0].communicate(timeout=300)      # the survivor must not hang
    waited = time.time() - t_kill
    assert procs[0].returncode != 0, log0[-2000:]
    assert "another task died" in log0 or "lost contact with another process" in log0, \
        log0[-2000:]
    assert not (out / "manifest.json").exists()
    partial = _outputs(out)
    assert 0 < len(partial) < IMAGES
    procs = [subprocess.Popen(c, **pipe) for c in cmds]   # the same commands, both
    for p in procs:
        log, _ = p.communicate(timeout=900)
        assert p.returncode == 0, log[-3000:]
        assert "resuming" in log, log[-2000:]
    resumed = _check_complete(out)
    _same(reference(), resumed)
    for key in partial:
        np.testing.assert_array_equal(partial[key][0], resumed[key][0])
    how = "lost contact" if "lost contact with another process" in log0 else "JAX heartbeat"
    print(f"survivor ended {waited:.1f} s after the kill ({how})")


def test_batch_size_must_be_a_multiple_of_the_micro_batch(tmp_path, capsys):
    job = _write_job(tmp_path / "job.jsonl", JOB[:1])
    out = tmp_path / "out"
    assert main(["batch", str(job), "--out-dir", str(out), "--batch-size", "3",
                 "--micro-batch", "2"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size 3" in err and "--micro-batch 2" in err, err
    assert not out.exists()


BAD = [
    ('{"id": "a", "prompt": "x", "seed": 1}\n{"id": "b", "prompt": "y", "seed": 2\n',
     ":2: invalid JSON"),
    ('{"id": "a", "prompt": "x", "seed": 1}\n\n["not", "an", "object"]\n', ":3: expected a JSON"),
    ('{"id": "a", "prompt": "x", "seed": 1, "method": "dreambooth"}\n', ':1: unknown "method"'),
    ('{"id": "a", "prompt": "x", "seed": 1, "stepz": 3}\n', "unknown argument(s) 'stepz'"),
    ('{"id": "a", "prompt": "x", "seed": 1, "targets": ["y"]}\n', 'need "method": "p2p"'),
    ('{"id": "a", "prompt": "x", "seed": 1, "method": "p2p", "targets": ["y"], "windows": 1}\n',
     "unknown argument(s) 'windows'"),
    ('{"id": "a", "prompt": "x", "seed": 1, "method": "p2p"}\n', '"targets"'),
    ('{"id": "a", "prompt": "x", "seed": 1, "method": "p2p", "targets": ["y"], '
     '"mode": "swap"}\n', '"mode"'),
    ('{"id": "a", "prompt": "x"}\n', ':1: missing "seed"'),
    ('{"id": "a", "prompt": "x", "seed": -1}\n', '"seed": -1 is outside'),
    ('{"id": "a", "prompt": "x", "seed": 1, "steps": 2.5}\n', '"steps"'),
    ('{"id": "a", "prompt": "x", "seed": 1}\n{"id": "a", "prompt": "y", "seed": 2}\n',
     ':2: duplicate "id"'),
    ('{"id": "a", "prompt": "x", "seed": 1, "scheduler": "plms"}\n', '"scheduler"'),
    ("", "no requests"),
]


@pytest.mark.parametrize("text,fragment", BAD)
def test_bad_job_is_one_line_before_any_work(text, fragment, tmp_path, capsys):
    job = tmp_path / "job.jsonl"
    job.write_text(text)
    out = tmp_path / "out"
    assert main(["batch", str(job), "--out-dir", str(out), "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert fragment in err and str(job) in err, err
    assert not out.exists()


def test_model_checks_name_the_line_before_any_work(tiny_sd_dir, tmp_path, capsys):
    job = _write_job(tmp_path / "job.jsonl", [
        {"id": "a", "prompt": "a red circle", "seed": 1},
        {"id": "b", "prompt": " ".join(["red"] * 90), "seed": 1}])
    out = tmp_path / "out"
    assert main(["batch", str(job), "--out-dir", str(out), "--model", str(tiny_sd_dir)]) == 2
    err = capsys.readouterr().err
    assert ":2:" in err and "77" in err, err
    assert not out.exists()


def test_out_dir_of_another_job_is_refused(tmp_path, capsys):
    job = _write_job(tmp_path / "job.jsonl", JOB[:1])
    out = tmp_path / "out"
    out.mkdir()
    (out / "job.json").write_text(json.dumps({"requests_sha256": "other"}))
    assert main(["batch", str(job), "--out-dir", str(out)]) == 2
    assert "another job" in capsys.readouterr().err
    (out / "job.json").unlink()
    (out / "mine.txt").write_text("x")
    assert main(["batch", str(job), "--out-dir", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]


def test_split_is_deterministic_and_complete():
    from jattn.batch import Request, split

    reqs = [Request(line=i, id=f"r{i:03d}", raw={}, prompt="x", seed=i, steps=None,
                    guidance_scale=None, negative_prompt="", height=None, width=None,
                    scheduler=None, method="generate", args={}) for i in range(1, 11)]
    parts = [split(reqs[::-1], 3, p) for p in range(3)]
    assert sorted(r.id for part in parts for r in part) == sorted(r.id for r in reqs)
    assert parts == [split(reqs, 3, p) for p in range(3)]


def test_new_prompts_and_seeds_reuse_the_compiled_program(tiny_sd_dir, tmp_path):
    """Calls of one bucket, and a second job with other prompts and seeds, run the same
    compiled program (one trace of the sampler)."""
    import jattn
    from jattn.batch import BatchSettings, run_job

    pipe = jattn.load(tiny_sd_dir)
    for n, (job, seeds) in enumerate([(JOB[:3], (1, 2, 3)), (JOB[2:3], (9,))]):
        rows = [dict(r, seed=s, id=f"{r['id']}-{s}") for r, s in zip(job, seeds)]
        path = _write_job(tmp_path / f"job{n}.jsonl", rows)
        s = BatchSettings(out_dir=str(tmp_path / f"out{n}"), batch_size=1, shard_size=2,
                          steps=2, progress=False)
        res = run_job(str(path), s, pipe=pipe, log_stream=io.StringIO())
        assert res.requests_run == len(rows)
        assert pipe.trace_counts["sample"] == 1, pipe.trace_counts


@pytest.mark.slow
def test_sdxl_job_matches_generate(tiny_sdxl_dir, tmp_path):
    """An SDXL checkpoint runs as a batch job: each request's image equals
    ``Pipeline.generate`` of the same prompt and seed (±1 uint8: another compiled program)
    — with micro-conditioning time ids, a negative prompt, and zero negative conditioning
    for a request without one (``force_zeros_for_empty_prompt``). Breaks if the job feeds
    SDXL's UNet without its added conditioning or drops the zeroed negatives."""
    import jattn
    from jattn.batch import BatchSettings, run_job

    pipe = jattn.load(tiny_sdxl_dir)
    rows = [{"id": "a", "prompt": "a red circle", "seed": 3},
            {"id": "b", "prompt": "a blue square", "seed": 4, "negative_prompt": "green"}]
    path = _write_job(tmp_path / "job.jsonl", rows)
    s = BatchSettings(out_dir=str(tmp_path / "out"), batch_size=2, micro_batch=2,
                      shard_size=2, steps=2, progress=False)
    res = run_job(str(path), s, pipe=pipe, log_stream=io.StringIO())
    assert res.requests_run == 2
    got = {m["id"]: img for img, m in _outputs(tmp_path / "out").values()}
    for r in rows:
        ref = pipe.generate(r["prompt"], r.get("negative_prompt"), seed=r["seed"],
                            num_inference_steps=2).images[0]
        diff = np.abs(got[r["id"]].astype(int) - np.asarray(ref).astype(int))
        assert diff.max() <= 1, (r["id"], diff.max())
