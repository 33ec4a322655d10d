"""The `epinfer bench` command: its flags (parsed by `epinfer.cli`) to one of the measurements,
in one process (`single`, `workload`), on spawned ranks (`parallel`) or through a server
(`serve_workload`), and the records printed."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from epinfer.core.config import EngineConfig
from epinfer.core.errors import UserError
from epinfer.core.sampling_params import SamplingParams
from epinfer.core.untrusted import check_output_path


def run_bench(args: argparse.Namespace, build_job: Callable) -> int:
    """`build_job(args, engine)`: the command line's run description (`epinfer.cli.build_job`)."""
    from epinfer.bench.single import bench, format_table

    if args.step_log is not None and (not args.workload or args.serve):
        raise UserError("--step-log logs the steps of a --workload run in this process (not --serve)")
    if args.step_log is not None:
        check_output_path(Path(args.step_log), "--step-log")  # before the run, not after
    # (a flag of the other kind of measurement would be ignored: a figure that is not what was asked)
    given = [f"--{flag.replace('_', '-')}" for flag in
             (("batch", "replica_batch", "compare_hf", "trace") if args.workload else
              ("serve", "concurrency", "num_requests", "max_num_seqs", "max_num_batched_tokens", "no_prefix_caching",
               "sampling"))
             if getattr(args, flag) not in (None, False)]
    if given and args.workload:
        raise UserError(f"{', '.join(given)}: not for --workload (it sizes the run from the profile and "
                        "--num-requests / --input-len / --output-len)")
    if given:
        raise UserError(f"{', '.join(given)}: for a --workload run only; add --workload NAME")
    if args.workload:
        return run_workload_bench(args)
    args.input_len = 128 if args.input_len is None else args.input_len
    args.output_len = 32 if args.output_len is None else args.output_len
    if not args.batch and not args.replica_batch:
        raise UserError("give at least one --batch B (or --replica-batch N0,N1,... with --dp), or --workload")
    if any(b < 1 for b in args.batch or []) or args.input_len < 1 or args.output_len < 1:
        raise UserError("--batch, --input-len and --output-len must be >= 1")
    if args.dp * args.tp > 1 or args.replica_batch:
        from epinfer.bench.parallel import bench_parallel

        replica = None
        if args.replica_batch:
            try:
                replica = [int(x) for x in args.replica_batch.split(",")]
            except ValueError:
                raise UserError(f"--replica-batch {args.replica_batch!r}: give counts like 64,8") from None
        engine = EngineConfig(dtype=args.dtype, device=args.device, cuda_graphs=not args.enforce_eager,
                              gpu_memory_utilization=args.gpu_memory_utilization,
                              async_scheduling=args.async_scheduling, parallel_graphs=args.parallel_graphs,
                              fp8_weights=args.quant == "fp8", mamba_ssm_cache_dtype=args.mamba_ssm_cache_dtype)
        records = bench_parallel(build_job(args, engine), args.shape, args.batch, args.input_len,
                                 args.output_len, args.layers, replica, args.trace)
        print("\n".join(json.dumps(r) for r in records))
        return 0
    records = bench(args.shape, args.batch, args.input_len, args.output_len, args.layers, args.device,
                    args.dtype, args.compare_hf, not args.enforce_eager, args.gpu_memory_utilization,
                    args.async_scheduling, args.trace, args.quant == "fp8", args.mamba_ssm_cache_dtype)
    print("\n".join(json.dumps(r) for r in records) if args.json else format_table(records))
    return 0


SAMPLING_FIELDS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "presence_penalty": float,
                   "frequency_penalty": float, "repetition_penalty": float}


def parse_sampling(text: str | None) -> dict | None:
    """--sampling KEY=VALUE,...: `SamplingParams` fields for every request of a workload, checked as
    a request's are."""
    if text is None:
        return None
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in SAMPLING_FIELDS:
            raise UserError(f"--sampling: {key!r} is not one of {', '.join(SAMPLING_FIELDS)} (KEY=VALUE,...)")
        try:
            out[key] = SAMPLING_FIELDS[key](value)
        except ValueError:
            raise UserError(f"--sampling: {key}={value!r} is not a number") from None
    try:  # (a bad value: one line now, not a failure of every request)
        SamplingParams(max_tokens=1, **out).resolved({})
    except UserError as exc:
        raise UserError(f"--sampling: {exc}") from None
    return out


def run_workload_bench(args: argparse.Namespace) -> int:
    from epinfer.bench.workload import bench_workload

    sampling = parse_sampling(args.sampling)

    if args.serve:
        from epinfer.bench.serve_workload import bench_serve_workload
        from epinfer.engine.memory import auto_max_num_batched_tokens

        flags = ["--dtype", args.dtype, "--device", args.device, *(["--max-num-seqs", str(args.max_num_seqs)]
                                                                   if args.max_num_seqs else []),
                 "--dp", str(args.dp), "--tp", str(args.tp), "--dispatch", args.dispatch,
                 "--dp-padding", args.dp_padding, "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
        switches = (("--async-scheduling", args.async_scheduling is True),
                    ("--no-async-scheduling", args.async_scheduling is False), ("--enforce-eager", args.enforce_eager),
                    ("--no-expert-parallel", args.no_expert_parallel), ("--no-prefix-caching", args.no_prefix_caching),
                    ("--fp8-weights", args.quant == "fp8"))
        flags += [flag for flag, on in switches if on] + ["--mamba-ssm-cache-dtype", args.mamba_ssm_cache_dtype]
        # (the device by name and its properties only: no CUDA context beside the server's)
        import torch

        gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
        budget = args.max_num_batched_tokens or auto_max_num_batched_tokens(
            torch.device("cuda" if gpu else "cpu"), torch.cuda.get_device_properties(0).total_memory if gpu else 0)
        record = bench_serve_workload(args.shape, args.workload, flags, args.layers, args.num_requests,
                                      args.input_len, args.output_len, args.concurrency, budget, sampling=sampling)
        print(json.dumps(record))
        return 0 if record["failed"] == 0 and record["server_exit"] == 0 else 1
    if args.dp * args.tp > 1:
        raise UserError("--workload without --serve runs one process: add --serve for --dp / --tp")
    if args.concurrency is not None:
        raise UserError("--concurrency is for --serve (offline, every request is submitted at once)")
    engine = EngineConfig(dtype=args.dtype, device=args.device, cuda_graphs=not args.enforce_eager,
                          gpu_memory_utilization=args.gpu_memory_utilization, async_scheduling=args.async_scheduling,
                          max_num_seqs=args.max_num_seqs or 0, max_num_batched_tokens=args.max_num_batched_tokens or 0,
                          enable_prefix_caching=not args.no_prefix_caching, fp8_weights=args.quant == "fp8",
                          mamba_ssm_cache_dtype=args.mamba_ssm_cache_dtype)
    record = bench_workload(args.shape, args.workload, engine, args.layers, args.num_requests, args.input_len,
                            args.output_len, step_log=args.step_log, sampling=sampling)
    print(json.dumps(record))
    return 0
