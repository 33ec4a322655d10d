"""Command line: `epinfer generate` (offline generation), `epinfer serve` (OpenAI-compatible HTTP).

Exit codes: 0 success; 2 bad input or usage, with one `epinfer: error: ...` line on stderr (the
traceback only with `--debug`); 1 an internal error.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from epinfer.core.checkpoint_files import model_folder
from epinfer.core.config import EngineConfig
from epinfer.core.env import SWITCHES, check_switches, under_torchrun
from epinfer.core.errors import (
    RunFailed,
    UserError,
    check_interrupted,
    forget_interrupts,
    import_noting_signals,
    interrupt,
)
from epinfer.core.layout import DISPATCHERS, PADDING_MODES, check_layout
from epinfer.core.prompts_file import PENALTIES, STDIN, line_params, read_prompts_file
from epinfer.core.sampling_params import check_text
from epinfer.core.untrusted import check_output_path, shown_path, write_atomic, written_in_place
from epinfer.diagnostics.faults import KINDS as FAULT_KINDS
from epinfer.diagnostics.numerics import degenerate_warnings
from epinfer.progress import Progress, generate_with_progress, plural, say, summary
from epinfer.runtime.job import Job

MAX_FAILURE_LINES = 5
CPU_RANK_BYTES = 256 << 20  # the least a CPU rank holds (Python, torch, its shard)
MAX_SECONDS = 10**9  # a time-out or delay flag (about 31 years)
BENCH_MAX = {"batch": 1 << 16, "num_requests": 1 << 20, "input_len": 1 << 20, "output_len": 1 << 20}
STATE_DTYPES = ("float32", "bfloat16", "float16", "auto")  # --mamba-ssm-cache-dtype


def add_serve_args(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a sequence slot before new ones get 429")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM")
    s.add_argument("--served-model-name", default=None, help="the model id in responses (default: --model)")
    s.add_argument("--chat-template", default=None, metavar="FILE|TEMPLATE",
                   help="a Jinja chat template (a file, or the template itself) instead of the tokenizer's")
    s.add_argument("--reasoning-parser", default=None, choices=["qwen3", "deepseek_r1"],
                   help="chat answers' <think> reasoning apart, as reasoning_content (Qwen3, Qwen3-Next, Qwen3.5)")
    s.add_argument("--api-key", default=None,
                   help="clients must send 'Authorization: Bearer KEY' to /v1/* (default: EPINFER_API_KEY, "
                        "else no key)")
    s.add_argument("--max-request-bytes", type=int, default=None,
                   help="larger request bodies get 413 (default: 16 bytes per token of the max model "
                        "length, at least 1 MiB)")
    hosts = p.add_argument_group("several hosts (host 0 serves HTTP; the same command on each, its own --node-rank)")
    hosts.add_argument("--nnodes", type=int, default=1, help="hosts of the run (each runs dp/nnodes whole replicas)")
    hosts.add_argument("--node-rank", type=int, default=0, help="this host: 0 serves HTTP, the others only compute")
    hosts.add_argument("--master-addr", default=None, help="host 0's address, reachable from every host")
    hosts.add_argument("--master-port", type=int, default=29500, help="host 0's rendezvous port")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint folder (default: the shipped demo model)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | xpu")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="running sequences at most (default: 512 on a GPU, unless the recurrent state of 512 "
                        "would take over a quarter of its memory; else 256)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens a step at most: decodes first, then prompt chunks "
                        "(default: 16384 on GPUs of 70 GiB or more, else 8192)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="prefill every prompt in full (default: reuse the KV blocks of cached prompt prefixes)")
    p.add_argument("--mamba-ssm-cache-dtype", default="auto", choices=STATE_DTYPES,
                   help="the GDN recurrent state's dtype (default auto: the compute dtype, as vLLM's default; in "
                        "bf16 half the state traffic, rounded every token; float32: transformers' arithmetic)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs for decode steps (CUDA runs use them by default)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="plan step n+1 while the device runs step n, sampled tokens staying on the device "
                        "(default: on for CUDA, off on CPU)")
    p.add_argument("--random-weights", action="store_true",
                   help="benchmarks: random weights, the model folder needs only config.json")
    p.add_argument("--fp8-weights", action="store_true",
                   help="an FP8 checkpoint: keep its weights in FP8 (block-scaled FP8 kernels on GPUs; not yet "
                        "measured there) instead of dequantising them to --dtype")
    p.add_argument("--cache-memory-gb", type=float, default=None,
                   help="memory for KV cache + recurrent state (default: automatic)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of the GPU's memory for weights, activations and the caches (default 0.9)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    add_parallel_args(p)


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    """The layout and diagnostics flags, the same for generate, serve and bench."""
    par = p.add_argument_group("parallelism")
    par.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    par.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per replica")
    par.add_argument("--dispatch", default="agrs", choices=DISPATCHERS, help="MoE dispatcher")
    par.add_argument("--dp-padding", default="uniform", choices=PADDING_MODES,
                     help="uniform: every replica runs the largest step; none: per-rank sizes")
    par.add_argument("--no-expert-parallel", action="store_true",
                     help="TP-shard the experts inside each replica instead of EP over all ranks")
    par.add_argument("--poison-pads", action="store_true",
                     help="debug: fill padding rows and never-written cache entries with NaN")
    par.add_argument("--collective-timeout", type=float, default=None,
                     help="seconds before a stuck collective fails the run (default 60 CPU, 600 GPU)")
    par.add_argument("--parallel-graphs", action=argparse.BooleanOptionalAction, default=SWITCHES.parallel_graphs,
                     help="experimental: decode CUDA graphs that hold the MoE / TP collectives (default: "
                          "EPINFER_PARALLEL_GRAPHS)")
    par.add_argument("--symm-mem", action=argparse.BooleanOptionalAction, default=SWITCHES.symm_mem,
                     help="experimental: small TP / EP collectives through symmetric memory on CUDA (default: "
                          "EPINFER_SYMM_MEM)")
    diag = p.add_argument_group("diagnostics")
    diag.add_argument("--dump-dir", default=None,
                      help="every rank writes its collective ledger here at exit (default: only on "
                           "failure, under ./epinfer-dumps/)")
    diag.add_argument("--check-collectives", action="store_true",
                      help="compare each collective's fingerprint across ranks before issuing it")
    diag.add_argument("--check-numerics", action="store_true",
                      help="NaN/Inf check of every layer output; flag degenerate generations")
    diag.add_argument("--fault", default=None, choices=FAULT_KINDS, help="inject a fault (tests/demos)")
    diag.add_argument("--fault-rank", type=int, default=0)
    diag.add_argument("--fault-step", type=int, default=0)
    diag.add_argument("--fault-delay", type=float, default=2.0)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """generate / serve: the engine flags."""
    return EngineConfig(model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                        max_num_seqs=args.max_num_seqs or 0, max_num_batched_tokens=args.max_num_batched_tokens or 0,
                        cache_memory_gb=args.cache_memory_gb, gpu_memory_utilization=args.gpu_memory_utilization,
                        cuda_graphs=not args.enforce_eager,
                        async_scheduling=args.async_scheduling, random_weights=args.random_weights,
                        parallel_graphs=args.parallel_graphs, enable_prefix_caching=not args.no_prefix_caching,
                        fp8_weights=args.fp8_weights, mamba_ssm_cache_dtype=args.mamba_ssm_cache_dtype)


def build_job(args: argparse.Namespace, engine: EngineConfig, mode=None) -> Job:
    """The one description of a run from the flags, for generate, serve and bench."""
    return Job(engine, args.dp, args.tp, args.dispatch, args.dp_padding, not args.no_expert_parallel,
               args.poison_pads, args.collective_timeout, dump_dir=args.dump_dir,
               check_collectives=args.check_collectives, check_numerics=args.check_numerics,
               symm_mem=args.symm_mem, symm_mem_bytes=SWITCHES.symm_mem_bytes if args.symm_mem else 1 << 20,
               fault=args.fault, fault_rank=args.fault_rank, fault_step=args.fault_step,
               fault_delay=args.fault_delay, mode=mode)


class OneLineParser(argparse.ArgumentParser):
    """A bad flag is one line and exit 2 (argparse prints the whole usage block first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="epinfer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate completions for prompts")
    add_engine_args(gen)
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    gen.add_argument("--prompts-file", type=Path, default=None,
                     help="JSONL, one request per line (- reads it from standard input)")
    gen.add_argument("--max-tokens", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--min-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    for penalty in PENALTIES:
        gen.add_argument(f"--{penalty.replace('_', '-')}", type=float, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--prompt-logprobs", type=int, default=None, metavar="N",
                     help="each prompt token's logprob, rank and the top N (0-20) in the results")
    gen.add_argument("--output", type=Path, default=None, help="write results as a JSON list")
    gen.add_argument("--compare-single", action="store_true",
                     help="also run single-process and report whether the tokens are identical")
    bench = sub.add_parser("bench", help="prefill / decode speed on a model shape with random weights")
    bench.add_argument("--shape", required=True, help="qwen3-30b-a3b | qwen3.5-35b-a3b | qwen3-next-80b-a3b | PATH")
    bench.add_argument("--layers", type=int, default=None, help="fewer layers than the real model")
    bench.add_argument("--batch", type=int, action="append", default=None)
    bench.add_argument("--workload", default=None,
                       metavar="throughput|long-context|generation-heavy|mixed|shared-prefix|multi-turn",
                       help="end to end: every request at once through the engine, as generate runs them")
    bench.add_argument("--num-requests", type=int, default=None, help="--workload: other than the profile's")
    bench.add_argument("--input-len", type=int, default=None, help="prompt tokens (default 128; --workload: its own)")
    bench.add_argument("--output-len", type=int, default=None,
                       help="generated tokens (default 32; --workload: its own)")
    bench.add_argument("--serve", action="store_true",
                       help="--workload through `epinfer serve` over HTTP (streaming clients; --dp/--tp apply)")
    bench.add_argument("--concurrency", type=int, default=None,
                       help="--workload --serve: concurrent streaming clients (default: every request at once)")
    bench.add_argument("--max-num-seqs", type=int, default=None,
                       help="--workload: running requests at most (default as for generate)")
    bench.add_argument("--max-num-batched-tokens", type=int, default=None,
                       help="--workload: tokens per step at most (default: 16384 on GPUs of 70 GiB or more, else 8192)")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    bench.add_argument("--compare-hf", action="store_true", help="also time transformers generate, same shape")
    bench.add_argument("--quant", choices=["fp8"], default=None,
                       help="fp8: random FP8 weights with 128 x 128 block scales (the floor from FP8 bytes)")
    bench.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    bench.add_argument("--mamba-ssm-cache-dtype", default="auto", choices=STATE_DTYPES,
                       help="the GDN recurrent state's dtype (default auto: the compute dtype)")
    bench.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                       help="plan step n+1 while step n runs (default: on for CUDA, off on CPU)")
    bench.add_argument("--no-prefix-caching", action="store_true", help="--workload: prefill every prompt in full")
    bench.add_argument("--sampling", default=None, metavar="KEY=VALUE,...",
                       help="--workload: sampling of every request (default greedy), e.g. the Qwen3.5 card's "
                            "temperature=0.7,top_p=0.8,top_k=20,presence_penalty=1.5")
    bench.add_argument("--step-log", default=None, metavar="FILE",
                       help="--workload: one JSON line per measured step (kind, rows, decode rows, ms)")
    bench.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                       help="share of GPU memory for weights + caches")
    bench.add_argument("--replica-batch", default=None,
                       help="requests per DP replica, e.g. 64,8 (imbalanced load; replaces --batch)")
    bench.add_argument("--trace", default=None, metavar="DIR",
                       help="write each batch's profiled decode steps as a Chrome trace (all ranks in one file)")
    bench.add_argument("--json", action="store_true", help="one JSON record per configuration")
    bench.add_argument("--debug", action="store_true", help="show tracebacks")
    add_parallel_args(bench)
    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming)")
    add_engine_args(srv)
    add_serve_args(srv)
    doc = sub.add_parser("doctor", help="analyse the collective dumps of a failed (or any) run")
    doc.add_argument("dump_dir")
    doc.add_argument("--json", action="store_true", help="print exactly one JSON object")
    doc.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def read_requests(args: argparse.Namespace) -> list[dict]:
    requests = [{"prompt": p} for p in args.prompt]
    for i, p in enumerate(args.prompt):  # bytes that are not UTF-8 reach argv as lone surrogates
        try:
            check_text("prompt", p)
        except UserError as exc:
            raise UserError(f"--prompt number {i + 1}: {exc}") from None
    if args.prompts_file == STDIN and under_torchrun():
        raise UserError("--prompts-file -: torchrun gives standard input to one process only; give a file")
    if args.prompts_file is not None:
        requests += read_prompts_file(args.prompts_file)
    if not requests:
        raise UserError("no prompts: give --prompt TEXT or --prompts-file FILE.jsonl")
    return requests


def run_generate(args: argparse.Namespace) -> int:
    import time

    from epinfer import LLM

    started = time.monotonic()
    requests = read_requests(args)
    check_output(args)  # before the run, not after
    params = [line_params(req, args, i) for i, req in enumerate(requests)]  # (checked: before any rank starts)
    prompts = [r.get("prompt", r.get("prompt_token_ids")) for r in requests]
    model = args.model or "the demo model"
    # stderr only (stdout holds the results): a start line, progress, one summary line at the end
    if args.dp * args.tp > 1 or under_torchrun():
        from epinfer.runtime.launch import launch, run_torchrun
        from epinfer.runtime.lockstep import GenerateMode

        job = build_job(args, engine_config(args), GenerateMode(prompts, params))
        progress = None  # under torchrun: no launcher to gather the replicas' progress
        if under_torchrun():
            outputs = run_torchrun(job)
        else:
            say(f"starting {args.dp * args.tp} ranks (dp={args.dp} tp={args.tp}) for {model} ...")
            progress = Progress.for_stream(len(prompts))
            try:
                outputs = launch(job, progress)
            finally:
                progress.close()
        if outputs is None:  # a torchrun rank other than 0
            return 0
    else:
        outputs, progress = generate_with_progress(lambda: LLM(engine=engine_config(args)), prompts, params, model)
    write_outputs(outputs, requests, args.output)
    say(summary(outputs, progress.seconds() if progress is not None else None, time.monotonic() - started))
    if args.check_numerics:
        for line in degenerate_warnings(outputs):
            print(f"epinfer: warning: {line}", file=sys.stderr)
    failed = [(i, o) for i, o in enumerate(outputs) if o.finish_reason == "error"]
    if failed:  # the others' results are written; the run still says it failed
        for i, o in failed[:MAX_FAILURE_LINES]:
            print(f"epinfer: error: request {i} failed: {o.error}", file=sys.stderr)
        if len(failed) > MAX_FAILURE_LINES:
            print(f"epinfer: error: ... and {len(failed) - MAX_FAILURE_LINES} more failed requests", file=sys.stderr)
        return 1
    if args.compare_single:
        single, _ = generate_with_progress(lambda: LLM(engine=engine_config(args)), prompts, params, model,
                                           label="single-process reference run", final_line=True)
        same = sum(a.token_ids == b.token_ids for a, b in zip(outputs, single, strict=True))
        layout = f"dp={args.dp} tp={args.tp} ep={args.dp * args.tp if not args.no_expert_parallel else 1}"
        verdict = "yes" if same == len(single) else "NO"
        print(f"tokens identical to the single-process run ({layout}): {verdict}, "
              f"{same}/{len(single)} requests")
        return 0 if same == len(single) else 1
    return 0


def write_outputs(outputs, requests: list[dict], path: Path | None) -> None:
    records = [{"prompt_token_ids": o.prompt_token_ids, "token_ids": o.token_ids, "text": o.text,
                "finish_reason": o.finish_reason, **({"error": o.error} if o.error else {}),
                **({"prompt_logprobs": [r and {"logprob": r[0], "rank": r[1], "top": r[2]} for r in o.prompt_logprobs]}
                   if o.prompt_logprobs is not None else {})} for o in outputs]
    if path is not None:
        text = json.dumps(records, indent=1) + "\n"
        in_place = written_in_place(path)
        try:
            if in_place:
                path.write_text(text)
            else:  # whole or not at all: a file already there stays as it was if the write fails;
                write_atomic(path.resolve(), [text])  # through a symbolic link, the file it names
        except OSError as exc:  # (a full disk): the run's results go to stdout rather than nowhere
            sys.stdout.write(text)
            state = "it may hold part of them" if in_place else "left as it was"
            raise RunFailed(1, f"cannot write --output {path} ({state}): {exc.strerror or exc}; "
                               "the results are on stdout instead") from None
        say(f"wrote {plural(len(records), 'result')} to {path}")  # stderr: stdout stays empty
        return
    for i, (req, rec) in enumerate(zip(requests, records, strict=True)):
        prompt = req.get("prompt", req.get("prompt_token_ids"))
        completion = rec["text"] if rec["text"] is not None else rec["token_ids"]
        print(f"--- request {i} ({rec['finish_reason']}, {len(rec['token_ids'])} tokens)")
        print(f"prompt:     {prompt!r}")
        print(f"completion: {completion!r}")


def check_output(args: argparse.Namespace) -> None:
    """--output names a file in an existing folder, and not the prompts file (its requests would be
    replaced by the results)."""
    if args.output is None:
        return
    check_output_path(args.output, "--output")
    # (after read_requests: the prompts file is there)
    if (args.prompts_file not in (None, STDIN) and args.output.exists()
            and args.output.samefile(args.prompts_file)):
        raise UserError(f"--output {shown_path(args.output)} is the prompts file: the results would replace "
                        "its requests; give another file")


def check_numbers(args: argparse.Namespace) -> None:
    """Every number flag the command has, given, in its range (before anything is imported or
    started): counts at least 1, ports in 0-65535, seconds finite."""
    def bad(flag: str, want: str):
        return UserError(f"--{flag.replace('_', '-')} must be {want}, got {getattr(args, flag)}")

    for flag in ("num_requests", "input_len", "output_len", "max_num_seqs", "max_num_batched_tokens", "concurrency"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise bad(flag, ">= 1")
    for flag in ("batch", "num_requests", "input_len", "output_len"):  # (a benchmark's prompts are built on the host)
        values = getattr(args, flag, None)
        for value in values if isinstance(values, list) else [values]:
            if value is not None and value > BENCH_MAX[flag]:
                raise bad(flag, f"at most {BENCH_MAX[flag]:,} (this is a benchmark's size, built in host memory)")
    for flag, lo in (("port", 0), ("master_port", 1)):
        value = getattr(args, flag, None)
        if value is not None and not lo <= value <= 65535:
            raise bad(flag, f"a port number, {lo} to 65535")
    # (a shorter wait for a collective fails healthy runs; a longer one than MAX_SECONDS overflows the
    # timers it reaches: the process group's timedelta, a lock's, a sleep's)
    for flag, lo in (("collective_timeout", 1.0), ("fault_delay", 0.0)):
        value = getattr(args, flag, None)
        if value is not None and not lo <= value <= MAX_SECONDS:
            raise bad(flag, f"a finite number of seconds >= {lo:g} and at most {MAX_SECONDS:,}")
    if getattr(args, "fault", None):  # (a fault that no rank would inject: a run that proves nothing)
        world = args.dp * args.tp
        if not 0 <= args.fault_rank < world or args.fault_step < 0:
            raise UserError(f"--fault-rank must be a rank of the run, 0 to {world - 1}, and --fault-step >= 0; "
                            f"got {args.fault_rank} and {args.fault_step}")
        if world == 1 and args.command != "serve" and not under_torchrun():
            raise UserError("--fault is injected by a rank of a parallel run: add --dp or --tp")
    if args.command in ("generate", "serve"):  # the engine's own fields, before any rank starts
        engine_config(args).checked()


def parallel_launch(args: argparse.Namespace) -> bool:
    """generate / serve starting its own ranks: what the preflight checks guard."""
    return args.command in ("generate", "serve") and args.dp * args.tp > 1 and not under_torchrun()


def preflight_model(args: argparse.Namespace) -> None:
    """The layout against the model's head and intermediate counts, from config.json alone: before
    torch is imported, so that a wrong --tp is refused in a moment."""
    if not parallel_launch(args):
        return
    from epinfer.core.config import DEMO_MODEL, ModelConfig
    from epinfer.core.layout import check_model_layout

    folder = model_folder(Path(args.model) if args.model else DEMO_MODEL)
    check_model_layout(ModelConfig.from_dir(folder), args.dp, args.tp, not args.no_expert_parallel)


def preflight_devices(args: argparse.Namespace) -> None:
    """Enough GPUs (or memory, on the CPU) for the ranks, before any of them starts."""
    if not parallel_launch(args):
        return
    import torch

    from epinfer.engine.device import resolve_device
    from epinfer.runner.model_runner import available_bytes

    kind, ranks = resolve_device(args.device).type, args.dp * args.tp
    if kind == "cuda" and torch.cuda.device_count() < ranks:
        raise UserError(f"--dp {args.dp} --tp {args.tp} needs {ranks} GPUs (one per rank); "
                        f"this machine has {torch.cuda.device_count()}")
    if kind != "cpu":
        return
    # a process a CPU rank: more than the memory holds would be started until the kernel's OOM kill
    local, have = ranks // max(1, getattr(args, "nnodes", 1)), available_bytes(torch.device("cpu"))
    if have is not None and local * CPU_RANK_BYTES > have:
        raise UserError(f"--dp {args.dp} --tp {args.tp} starts {local} rank processes on this host, each "
                        f"at least {CPU_RANK_BYTES >> 20} MiB; this machine has {have >> 20} MiB available")


HEAVY_IMPORTS = ("torch",)  # generate, bench and serve: imported first, a Ctrl-C meanwhile kept (import_noting_signals)


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "pthread_sigmask"):  # a SIGINT / SIGTERM blocked by whatever started us would never come
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    if hasattr(signal, "SIGUSR1") and signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # "dump now" must never kill a run starting up
    args = build_parser().parse_args(argv)
    # a SIGTERM stops generate / bench / serve in this process as Ctrl-C does (the line, 143) until a
    # parallel run or the server takes it over; torchrun's ranks handle it themselves
    forget_interrupts()
    old = signal.getsignal(signal.SIGTERM)
    if args.command != "doctor" and old == signal.SIG_DFL and not under_torchrun():
        signal.signal(signal.SIGTERM, interrupt)
    try:
        return _main(args)
    finally:
        forget_interrupts()
        if signal.getsignal(signal.SIGTERM) is interrupt:
            signal.signal(signal.SIGTERM, old)


def _main(args: argparse.Namespace) -> int:
    try:
        check_switches()
        check_layout(getattr(args, "dp", 1), getattr(args, "tp", 1))  # (one process too: dp 0 is no layout)
        check_numbers(args)
        preflight_model(args)
        if args.command != "doctor":
            import_noting_signals(HEAVY_IMPORTS)
        preflight_devices(args)
        check_interrupted()  # (a SIGTERM whose exception an import dropped)
        if args.command == "generate":
            return run_generate(args)
        if args.command == "bench":
            from epinfer.bench.command import run_bench

            return run_bench(args, build_job)
        if args.command == "serve":
            try:
                from epinfer.server.main import serve
            except ImportError as exc:
                if exc.name not in ("fastapi", "uvicorn", "starlette", "pydantic"):
                    raise
                raise UserError(f"epinfer serve needs {exc.name}: pip install 'epinfer[serve]'") from None
            return serve(args, build_job(args, engine_config(args)))
        if args.command == "doctor":
            from epinfer.diagnostics.doctor import main as doctor

            return doctor(args.dump_dir, args.json)
        raise UserError(f"unknown command {args.command}")
    except UserError as exc:
        if args.debug:
            raise
        say(f"error: {exc}")  # one write: the ranks of a torchrun share stderr
        return exc.exit_code
    except RunFailed as exc:
        say(f"error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt as exc:  # (`Interrupted` carries the signal: 143 for SIGTERM)
        signum = getattr(exc, "signum", signal.SIGINT)
        say("interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}")
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
