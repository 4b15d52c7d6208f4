"""``jattn batch JOB.jsonl --out-dir DIR``: a resumable, sharded batch job (see
:mod:`jattn.batch`)."""

from __future__ import annotations

from jattn.commands.common import GUIDANCE, SCHEDULERS, STEPS, int_type


def register(sub, edit_sub=None) -> None:
    p = sub.add_parser(
        "batch", help="a large resumable batch job (JSONL) → WebDataset shards + Parquet index",
        description="Run every request of a JSONL job (one {\"id\", \"prompt\", \"seed\", …} "
                    "per line) over all devices of all processes; outputs WebDataset tar "
                    "shards, a Parquet index per process and manifest.json. Restart the same "
                    "command to resume after a crash.")
    p.add_argument("job", help="JSONL file, one request per line")
    p.add_argument("--out-dir", required=True,
                   help="output folder: new/empty, or the folder of this same job (resume)")
    p.add_argument("--batch-size", type=int_type(1, 4096), default=4,
                   help="requests (edit groups) per device per compiled call (default 4), "
                        "a multiple of --micro-batch; may change between restarts of a job")
    p.add_argument("--micro-batch", type=int_type(1, 4096), default=1,
                   help="requests (edit groups) per kernel call: each device runs its "
                        "--batch-size requests as micro-batches of this size one after the "
                        "other (default 1). Images depend on it (fixed for a job); larger "
                        "values use accelerators better")
    p.add_argument("--shard-size", type=int_type(1, 10**7), default=256,
                   help="requests per WebDataset shard (default 256)")
    p.add_argument("--steps", type=STEPS, default=50,
                   help="default denoising steps of requests without \"steps\"")
    p.add_argument("--guidance-scale", type=GUIDANCE, default=7.5,
                   help="default CFG scale of requests without \"guidance_scale\"")
    p.add_argument("--scheduler", choices=SCHEDULERS, default=None,
                   help="default scheduler (default: the checkpoint's; p2p: ddim)")
    p.add_argument("--num-devices", type=int_type(1, 1 << 20), default=None,
                   help="local devices to use per process (default: all)")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="jax.distributed coordinator (default: auto-detected on TPU/Slurm)")
    p.add_argument("--num-processes", type=int_type(1, 1 << 20), default=None)
    p.add_argument("--process-id", type=int_type(0, 1 << 20), default=None)
    p.add_argument("--heartbeat-timeout", type=int_type(1, 86400), default=100,
                   metavar="S",
                   help="several processes: a process that stops sending heartbeats (killed, "
                        "crashed) ends the others after S seconds (default 100, JAX's); "
                        "restart the same command on every process to resume")
    p.add_argument("--mesh", choices=["global", "local"], default="global",
                   help="several processes: one program over every process's devices "
                        "(global, default) or each process on its own devices (local)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--model", default=None,
                   help="diffusers-layout folder or Hugging Face hub id (default: bundled model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of errors (also JATTN_DEBUG=1)")
    p.set_defaults(func=cmd_batch)


def cmd_batch(args) -> int:
    from jattn.batch import BatchSettings, run_job

    s = BatchSettings(out_dir=args.out_dir, batch_size=args.batch_size,
                      micro_batch=args.micro_batch,
                      shard_size=args.shard_size, steps=args.steps,
                      guidance_scale=args.guidance_scale, scheduler=args.scheduler,
                      model=args.model, dtype=args.dtype, num_devices=args.num_devices,
                      progress=not args.no_progress, mesh=args.mesh,
                      heartbeat_timeout=args.heartbeat_timeout)
    run_job(args.job, s, coordinator=args.coordinator, num_processes=args.num_processes,
            process_id=args.process_id)
    return 0
