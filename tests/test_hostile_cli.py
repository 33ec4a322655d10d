"""Hostile or careless input on the command line: `epinfer generate` flags and JSONL lines, the
numbers of serve and bench, the environment, --output and --dump-dir. Every bad value is one line
and exit 2, before any rank starts; a request that fails alone leaves the others written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from epinfer import LLM, SamplingParams
from epinfer.cli import main
from epinfer.core.errors import UserError

# --- the command line ------------------------------------------------------------------------------

def cli_cases(tmp_path):
    def jsonl(name: str, text: str | bytes):
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["--prompts-file", str(path)]

    hi = ["--prompt", "hi"]
    return [
        ([*hi, "--seed", str(2**70)], "request 0: seed must be an integer in [0, 18446744073709551615]"),
        ([*hi, "--prompt", "x", "--seed", str(2**64 - 1)], "request 1: seed must be an integer in"),
        ([*hi, "--temperature", "nan"], "temperature must be a finite number, got nan"),
        ([*hi, "--temperature", "inf"], "temperature must be a finite number, got inf"),
        ([*hi, "--temperature", "-1"], "temperature must be >= 0"),
        ([*hi, "--top-p", "0"], "top_p must be in (0, 1]"),
        ([*hi, "--top-p", "nan"], "top_p must be a finite number"),
        ([*hi, "--top-k", "-7"], "top_k must be -1, 0 (off) or positive"),
        ([*hi, "--max-tokens", "0"], "max_tokens must be an integer >= 1"),
        (jsonl("seed.jsonl", '{"prompt": "hi", "seed": 18446744073709551616}\n'), "seed.jsonl:1: seed must be"),
        (jsonl("nan.jsonl", '{"prompt": "hi"}\n{"prompt": "hi", "temperature": NaN}\n'),
         "nan.jsonl:2: temperature must be a finite number"),
        (jsonl("inf.jsonl", '{"prompt": "hi", "top_p": Infinity}\n'), "inf.jsonl:1: top_p must be a finite"),
        (jsonl("surrogate.jsonl", '{"prompt": "a\\ud800b"}\n'), "surrogate.jsonl:1: prompt is not valid Unicode"),
        (["--prompt", "caf\udce9"], "--prompt number 1: prompt is not valid Unicode"),
        (jsonl("stop.jsonl", '{"prompt": "hi", "stop": ["\\udfff"]}\n'), "stop is not valid Unicode"),
        (jsonl("bytes.jsonl", b'{"prompt": "caf\xe9"}\n'), "bytes.jsonl: not UTF-8 text (byte 15)"),
        (jsonl("deep.jsonl", "[" * 100_000 + "\n"), "deep.jsonl:1: malformed JSON"),
        ([*hi, "--output", str(tmp_path / "missing" / "out.json")], "not a file in an existing folder"),
        ([*hi, "--output", str(tmp_path)], "not a file in an existing folder"),
        ([*jsonl("same.jsonl", '{"prompt": "hi"}\n'), "--output", str(tmp_path / "same.jsonl")],
         "same.jsonl is the prompts file: the results would replace its requests"),
        ([*hi, "--cache-memory-gb", "nan"], "(--cache-memory-gb) must be a finite number > 0, got nan"),
        ([*hi, "--max-model-len", "2000"], "(--max-model-len) 2,000 is beyond the model's 1,024 positions"),
        ([*hi, "--cache-memory-gb", "inf", "--dp", "2"], "(--cache-memory-gb) must be a finite number > 0"),
        ([*hi, "--collective-timeout", "0", "--dp", "2"], "--collective-timeout must be a finite number of"),
        ([*hi, "--collective-timeout", "nan"], "--collective-timeout must be a finite number of seconds >= 1"),
        ([*hi, "--collective-timeout", "1e300", "--dp", "2"], "at most 1,000,000,000, got 1e+300"),
        ([*hi, "--fault", "delay", "--dp", "2", "--fault-delay", "1e300"], "--fault-delay must be a finite number"),
        (["--prompts-file", str(tmp_path)], "not a regular file (a directory)"),
        ([*hi, "--model", str(tmp_path / "seed.jsonl")], "not a folder (a regular file)"),
    ]


def test_generate_bad_flags_and_lines(tmp_path, capsys):
    for argv, fragment in cli_cases(tmp_path):
        code = main(["generate", *argv])
        out, err = capsys.readouterr()
        assert code == 2, (argv, err)
        assert err.count("\n") == 1 and err.startswith("epinfer: error:") and fragment in err, (argv, err)
        assert "Traceback" not in err and not out


def test_cpu_ranks_beyond_the_memory_are_refused(capsys, monkeypatch):
    """A CPU run of more rank processes than the memory holds is one line before any starts (--dp
    100000 started processes until the kernel's OOM kill); the per-rank size is raised here so that
    two ranks are already too many, and a run that wrongly started would be a short one."""
    import epinfer.cli as cli

    monkeypatch.setattr(cli, "CPU_RANK_BYTES", 1 << 60)
    assert main(["generate", "--prompt", "hi", "--max-tokens", "1", "--dp", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "starts 2 rank processes on this host, each at least" in err, err


def test_serve_listens_on_a_bracketed_ipv6_address():
    """`--host [::1]` (an IPv6 address as a URL writes it) is the address ::1, not an unknown host."""
    import socket

    from epinfer.server.main import bind

    try:
        socket.socket(socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 on this host")
    for host in ("[::1]", "::1"):
        sock = bind(host, 0)
        assert sock.family == socket.AF_INET6 and sock.getsockname()[0] == "::1"
        sock.close()


def test_serve_and_environment_bad_numbers(tmp_path, capsys, monkeypatch):
    for argv, fragment in [(["serve", "--port", "70000"], "--port must be a port number, 0 to 65535"),
                           (["serve", "--port", "-1"], "--port must be a port number"),
                           (["serve", "--master-port", "0"], "--master-port must be a port number, 1 to"),
                           (["serve", "--host", " ", "--model", "/nonexistent"], "--host is empty: give an address"),
                           (["serve", "--api-key", "", "--model", "/nonexistent"], "--api-key is empty: give the key"),
                           (["generate", "--prompt", "hi", "--gpu-memory-utilization", "1.5"],
                            "gpu_memory_utilization (--gpu-memory-utilization) must be in (0, 1], got 1.5"),
                           (["generate", "--prompt", "hi", "--fault", "kill", "--dp", "2", "--fault-rank", "2"],
                            "--fault-rank must be a rank of the run, 0 to 1, and --fault-step >= 0; got 2 and 0"),
                           (["generate", "--prompt", "hi", "--fault", "delay", "--dp", "2", "--fault-step", "-1"],
                            "--fault-rank must be a rank of the run"),
                           (["generate", "--prompt", "hi", "--fault", "nan-logits"], "add --dp or --tp")]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and fragment in err, (argv, err)
    from epinfer.cli import build_parser, engine_config

    for command in ("generate", "serve"):  # (as vLLM's flag: the engine gets it)
        args = build_parser().parse_args([command, "--gpu-memory-utilization", "0.5"])
        assert engine_config(args).gpu_memory_utilization == 0.5
    torchrun = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "29500", "MASTER_ADDR": "127.0.0.1"}
    tables = tmp_path / "t.json"
    tables.write_text('{"grouped": [[1, ')
    for env, fragment in [({"EPINFER_STACKS_AFTER": "0.001"}, "EPINFER_STACKS_AFTER='0.001': give at least 1"),
                          ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_PORT='' is not what torchrun sets"),
                          ({**torchrun, "GROUP_RANK": "x"}, "GROUP_RANK='x' is not what torchrun sets"),
                          ({**torchrun, "LOCAL_RANK": "-1"}, "LOCAL_RANK='-1' is not what torchrun sets"),
                          ({**torchrun, "RANK": "1"}, "RANK='1' is not what torchrun sets"),
                          ({**torchrun, "MASTER_ADDR": ""}, "MASTER_ADDR='' is not what torchrun sets"),
                          ({"EPINFER_MOE_CONFIGS": str(tmp_path / "no.json")}, "no.json': cannot read it"),
                          ({"EPINFER_MOE_CONFIGS": str(tables)}, "t.json': not a JSON tile table (Expecting"),
                          ({"EPINFER_RECORD_KERNELS": str(tmp_path / "no" / "k.jsonl")}, "not a file in an existing")]:
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            if "MASTER_PORT" not in env:
                m.delenv("MASTER_PORT", raising=False)
            assert main(["generate", "--prompt", "hi"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and fragment in err, (env, err)


def test_torchrun_store_out_of_reach_is_one_line(capsys, monkeypatch):
    """Under torchrun's variables with no store to reach (leftovers, or the launcher gone): one line
    naming the address, not a traceback after the connection's time-out."""
    import torch.distributed as dist

    def unreachable(*args, **kwargs):
        raise dist.DistNetworkError("The client socket has timed out after 60000ms while trying to connect to "
                                    "(10.9.9.9, 29500).")

    monkeypatch.setattr(dist, "TCPStore", unreachable)
    from epinfer.runtime import launch  # (a rank's SIGTERM block and waiter must not stay in this process:
    monkeypatch.setattr(launch, "dump_on_sigterm", lambda: None)  # every later child would inherit the block)
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "29500", "MASTER_ADDR": "10.9.9.9"}.items():
        monkeypatch.setenv(k, v)
    assert main(["generate", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach torchrun's rendezvous store at 10.9.9.9:29500" in err, err


def test_generate_output_that_cannot_be_written_goes_to_stdout(capsys):
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    assert main(["generate", "--prompt", "hi", "--max-tokens", "2", "--output", "/dev/full"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)[0]["finish_reason"] == "length"
    assert "cannot write --output /dev/full" in err and "the results are on stdout instead" in err


def test_generate_output_is_replaced_whole_or_not_at_all(tmp_path, capfd, monkeypatch):
    """--output goes to a temporary file renamed over the old one: a write that fails leaves the old
    file as it was (the results go to stdout), a read-only file or folder is refused before the run,
    a symbolic link keeps pointing at the new results, and /dev/stdout is written to, not replaced."""
    import os

    old, link = tmp_path / "out.json", tmp_path / "link.json"
    old.write_text("previous results\n")
    argv = ["generate", "--prompt", "hi", "--max-tokens", "2", "--output"]
    with monkeypatch.context() as m:
        def full(src, dst):
            raise OSError(28, "No space left on device")
        m.setattr(os, "replace", full)
        assert main([*argv, str(old)]) == 1
    out, err = capfd.readouterr()
    assert old.read_text() == "previous results\n" and json.loads(out)[0]["finish_reason"] == "length"
    assert "cannot write --output" in err and "(left as it was): No space left on device" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temporary file left behind
    with monkeypatch.context() as m:  # (as root, access() says yes to everything)
        m.setattr(os, "access", lambda path, mode: Path(path) not in (old, tmp_path / "ro"))
        assert main([*argv, str(old)]) == 2
        (tmp_path / "ro").mkdir()
        assert main([*argv, str(tmp_path / "ro" / "out.json")]) == 2
    _, err = capfd.readouterr()
    assert "out.json: the file is read-only" in err and "cannot write in its folder (permission denied)" in err, err
    assert old.read_text() == "previous results\n"
    link.symlink_to(old)
    assert main([*argv, str(link)]) == 0
    assert link.is_symlink() and json.loads(old.read_text())[0]["finish_reason"] == "length"
    capfd.readouterr()
    if Path("/dev/stdout").exists():
        assert main([*argv, "/dev/stdout"]) == 0
        assert json.loads(capfd.readouterr().out)[0]["finish_reason"] == "length"


def test_generate_tiny_temperature_is_greedy(tmp_path, capsys):
    outs = []
    for temp in ("1e-50", "0"):
        path = tmp_path / f"t{temp}.json"
        assert main(["generate", "--prompt", "Beautiful is", "--max-tokens", "6", "--temperature", temp,
                     "--seed", "5", "--output", str(path)]) == 0, capsys.readouterr().err
        outs.append(json.loads(path.read_text())[0]["token_ids"])
    assert outs[0] == outs[1]


def test_generate_failed_request_keeps_the_others(tmp_path, capsys):
    """dp=2 on Gloo: rank 0's first sampled row turns NaN at step 0 (`--fault nan-logits`); that
    request fails with a line naming it, the others are written and equal the single-process run,
    and the exit code says the run was not clean."""
    prompts = ["Beautiful is", "Flat is", "Sparse is", "Now is"]
    out = tmp_path / "out.json"
    argv = ["generate", *sum((["--prompt", p] for p in prompts), []), "--max-tokens", "5", "--dp", "2",
            "--temperature", "0", "--fault", "nan-logits", "--fault-rank", "0", "--fault-step", "0",
            "--collective-timeout", "60", "--output", str(out)]
    code = main(argv)
    _, err = capsys.readouterr()
    assert code == 1, err
    records = json.loads(out.read_text())
    assert records[0]["finish_reason"] == "error" and "non-finite logits" in records[0]["error"]
    assert "epinfer: error: request 0 failed: the model produced non-finite logits" in err
    want = LLM().generate(prompts[1:], SamplingParams(max_tokens=5, temperature=0))
    assert [r["token_ids"] for r in records[1:]] == [w.token_ids for w in want]


def test_dump_dir_holds_only_epinfer_files_to_replace(tmp_path):
    """--dump-dir replaces a previous run's ledgers, never the user's files in that folder; a dump
    dir that cannot be a folder is one line."""
    from types import SimpleNamespace

    from epinfer.runtime.launch import prepare_dump_dir

    for name in ("rankings.csv", "rank.notes.md", "rank0.jsonl", "rank12.stderr.txt", "rank3.tmp77"):
        (tmp_path / name).write_text("x")
    (tmp_path / "rank9.d").mkdir()
    prepare_dump_dir(SimpleNamespace(dump_dir=str(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank.notes.md", "rank9.d", "rankings.csv"]
    with pytest.raises(UserError, match="--dump-dir .*: cannot use it"):
        prepare_dump_dir(SimpleNamespace(dump_dir=str(tmp_path / "rankings.csv" / "sub")))
    assert main(["bench", "--shape", "qwen3-30b-a3b", "--batch", str(10**8)]) == 2


def test_prompts_file_from_standard_input(tmp_path, monkeypatch):
    """`--prompts-file -` reads the requests from a pipe (a real process: its results equal those of
    the same lines in a file); a terminal on standard input, or a torchrun rank, is one line."""
    import io
    import subprocess
    import sys
    from argparse import Namespace

    from epinfer.cli import read_requests

    lines = '{"prompt_token_ids": [5, 6, 7], "max_tokens": 3}\n{"prompt": "Beautiful is", "max_tokens": 4}\n'
    (tmp_path / "p.jsonl").write_text(lines)
    outs = []
    for source, stdin in (("-", lines), (str(tmp_path / "p.jsonl"), "")):
        out = tmp_path / f"out{len(outs)}.json"
        proc = subprocess.run([sys.executable, "-m", "epinfer", "generate", "--prompts-file", source, "--output",
                               str(out)], input=stdin, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        outs.append(json.loads(out.read_text()))
    assert outs[0] == outs[1] and [len(o["token_ids"]) for o in outs[0]] == [3, 4]

    class Terminal(io.TextIOWrapper):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Terminal(io.BytesIO(b"")))
    with pytest.raises(UserError, match="reads the requests from standard input, and that is a terminal"):
        read_requests(Namespace(prompt=[], prompts_file=Path("-")))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="torchrun gives standard input to one process only"):
        read_requests(Namespace(prompt=[], prompts_file=Path("-")))


def test_prompts_file_lines_end_at_newline_only(tmp_path):
    """JSON allows U+2028, U+2029 and U+0085 unescaped inside a string: a JSONL line holding one is
    one request (str.splitlines cut it in two), CRLF line ends are fine, and line numbers count
    newlines only."""
    from argparse import Namespace

    from epinfer.cli import read_requests

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a\u2028b\u0085c\u2029d"}\r\n{"prompt_token_ids": [1]}\n', encoding="utf-8")
    requests = read_requests(Namespace(prompt=[], prompts_file=path))
    assert [r.get("prompt", r.get("prompt_token_ids")) for r in requests] == ["a\u2028b\u0085c\u2029d", [1]]
    assert [r["where"] for r in requests] == [f"{path}:1", f"{path}:2"]
    path.write_text('{"prompt": "x\u2028y"}\n{"prompt_token_ids": [1]}\u2028{"prompt_token_ids": [2]}\n')
    with pytest.raises(UserError, match=r"p\.jsonl:2: malformed JSON"):
        read_requests(Namespace(prompt=[], prompts_file=path))


def test_bench_step_log_checked_before_the_run(tmp_path, capsys):
    """--step-log that cannot be a file (a folder, a missing folder), or that would log nothing (no
    --workload, --serve), is one line before the run, not a traceback after it."""
    from tests.checkpoints import tiny_config

    (tmp_path / "config.json").write_text(tiny_config("qwen3_moe").to_json_string())
    bench = ["bench", "--shape", str(tmp_path), "--device", "cpu", "--dtype", "float32"]
    work = ["--workload", "throughput", "--num-requests", "2", "--input-len", "4", "--output-len", "2"]
    for argv, fragment in [([*work, "--step-log", str(tmp_path)], "not a file in an existing folder"),
                           ([*work, "--step-log", str(tmp_path / "no" / "s.jsonl")], "not a file in an existing"),
                           (["--batch", "1", "--step-log", str(tmp_path / "s.jsonl")], "--step-log logs the steps"),
                           ([*work, "--serve", "--step-log", str(tmp_path / "s.jsonl")], "(not --serve)")]:
        assert main([*bench, *argv]) == 2, argv
        out, err = capsys.readouterr()
        assert err.count("\n") == 1 and err.startswith("epinfer: error: --step-log") and fragment in err, err
        assert not out


def test_a_signal_whose_exception_python_drops_is_kept(monkeypatch):
    """A SIGTERM handled inside code whose exceptions Python drops (a weakref callback, as
    importlib's module-lock cleanup is: `Interrupted` printed as "Exception ignored" and the start
    went on to serve) is still acted on: by the next block that notes signals, and by the
    command line's check before it runs the command."""
    import gc
    import signal
    import sys
    import weakref

    from epinfer.core.errors import Interrupted, check_interrupted, forget_interrupts, interrupt, noting_signals

    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: dropped.append(info.exc_type))
    forget_interrupts()
    try:
        class Thing:
            pass

        thing = Thing()
        ref = weakref.ref(thing, lambda r: interrupt(signal.SIGTERM))  # (the handler ran in the callback)
        del thing
        gc.collect()
        assert dropped == [Interrupted] and ref() is None
        with noting_signals() as signals:
            assert signals.first() == signal.SIGTERM
        with pytest.raises(Interrupted) as stop:
            check_interrupted()
        assert stop.value.signum == signal.SIGTERM
    finally:
        forget_interrupts()
    check_interrupted()  # (forgotten: nothing raised)


def test_interrupt_while_torch_imports_is_kept(tmp_path, capsys, monkeypatch):
    """A Ctrl-C while the heavy modules import stops the run (130, one line) even where the import
    drops the KeyboardInterrupt, as torch does while it imports numpy (the run went on, exit 0)."""
    import sys

    from epinfer import cli

    (tmp_path / "swallows_sigint.py").write_text(
        "import os, signal, time\ntry:\n    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(0.2)\n"
        "except KeyboardInterrupt:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "HEAVY_IMPORTS", ("swallows_sigint",), raising=False)
    monkeypatch.delitem(sys.modules, "swallows_sigint", raising=False)
    assert main(["generate", "--prompt", "hi", "--max-tokens", "2"]) == 130
    out, err = capsys.readouterr()
    assert err == "epinfer: interrupted\n" and not out
