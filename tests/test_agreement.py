"""The pieces of a run across hosts that need no second host: the settings every host must share
(`runtime.agreement`), the relay's frames (`server.nodes`), and the flags of `serve --nnodes`."""

from __future__ import annotations

import argparse
import pickle
import socket
import threading

import pytest
import torch.distributed as dist

from epinfer.core.config import EngineConfig
from epinfer.core.errors import UserError
from epinfer.runtime.agreement import agree, model_fingerprint, start_settings
from epinfer.runtime.job import Job
from epinfer.server.nodes import Nodes, read_frames, send_frame


def run_agreement(settings: list[dict], timeout: float = 10.0) -> list[str | None]:
    """Each participant in its own thread, as each host would be; what each one raised."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)
    errors: list[str | None] = [None] * len(settings)

    def one(i: int) -> None:
        store = dist.TCPStore("127.0.0.1", server.port, is_master=False, use_libuv=True)
        try:
            agree(store, i, len(settings), settings[i], lambda j, v: f"host {j}", timeout)
        except UserError as exc:
            errors[i] = str(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(settings))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 20)
    return errors


def test_hosts_agree_or_all_stop_with_the_same_line(ckpt_dir):
    job = Job(EngineConfig(dtype="float32"), 2, 2)
    same = start_settings(job, **{"--nnodes": 2})
    assert run_agreement([same, dict(same), dict(same)]) == [None, None, None]
    other = start_settings(Job(EngineConfig(model=str(ckpt_dir("qwen3_moe")), dtype="float32"), 2, 1),
                           **{"--nnodes": 2})
    errors = run_agreement([same, dict(same), other])
    assert len(set(errors)) == 1 and errors[0].startswith("host 2 does not match: --tp 1 there, 2 on host 0; "
                                                          "the model config "), errors
    assert "where" not in errors[0]  # (reported, never compared)
    assert run_agreement([same | {"where": 0}, same | {"where": 1}]) == [None, None]
    fp8 = start_settings(Job(EngineConfig(dtype="float32", fp8_weights=True), 2, 2), **{"--nnodes": 2})
    errors = run_agreement([same, fp8])
    assert errors[0] == errors[1] == "host 1 does not match: --fp8-weights True there, False on host 0: " \
        "every host needs the same model and flags", errors


def test_a_host_that_never_comes_is_named():
    errors = run_agreement([{"--dp": 2}], timeout=1.0)
    assert errors == [None]
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)
    with pytest.raises(UserError, match=r"^host 1, host 2 did not start within 1 s"):
        agree(server, 0, 3, {"--dp": 2}, lambda j, v: f"host {j}", 1.0)


def test_the_model_fingerprint_follows_the_content(ckpt_dir, tmp_path):
    folder = ckpt_dir("qwen3_moe")
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in folder.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert model_fingerprint(EngineConfig(model=str(copy))) == model_fingerprint(EngineConfig(model=str(folder)))
    assert model_fingerprint(EngineConfig()) != model_fingerprint(EngineConfig(model=str(folder)))
    assert model_fingerprint(EngineConfig(model=str(folder), random_weights=True)).endswith("random weights")


def test_relay_frames_carry_plain_values_only():
    a, b = socket.socketpair()
    with a, b:
        message = ("out", 2, ("step", 1, [(7, [1, 2], None, "stop", None)], [7], (1, 0, 2.5), 0.01))
        send_frame(a, message)
        evil = pickle.dumps(("out", 2, argparse.Namespace(x=1)))  # any object needs a class lookup
        a.sendall(len(evil).to_bytes(4, "big") + evil)
        frames = read_frames(b)
        assert next(frames) == message
        with pytest.raises(pickle.UnpicklingError, match="plain values only"):
            next(frames)


@pytest.mark.parametrize("flags, message", [
    (dict(nnodes=2, node_rank=0, master_addr=None), "--nnodes > 1 needs --master-addr"),
    (dict(nnodes=2, node_rank=2, master_addr="h"), "--node-rank must be in 0..1"),
    (dict(nnodes=2, node_rank=0, master_addr="h", dp=3), "--nnodes 2 needs --dp to be a multiple of it"),
    (dict(nnodes=2, node_rank=0, master_addr="h", master_port=0), "--master-port must be a TCP port"),
])
def test_serve_nnodes_flags(flags, message):
    dp = flags.pop("dp", 2)
    args = argparse.Namespace(**({"master_port": 29500} | flags))
    with pytest.raises(UserError, match=message):
        Nodes.from_args(args, dp, 1)
    assert Nodes.from_args(argparse.Namespace(nnodes=2, node_rank=1, master_addr="h", master_port=1), 4, 2) \
        .local_ranks(8) == range(4, 8)


def test_the_version_hosts_compare_is_the_packaged_one():
    import tomllib
    from pathlib import Path

    import epinfer
    from epinfer.core.version import VERSION

    project = tomllib.loads((Path(epinfer.__file__).parent.parent / "pyproject.toml").read_text())["project"]
    assert project["version"] == VERSION == epinfer.__version__


def test_agreement_wait_ends_on_a_signal_or_a_lost_store():
    """The wait for the other participants polls: a signal noted meanwhile stops it (`Interrupted`
    with its number), and a store whose holder is gone is one line, not the store's traceback."""
    from epinfer.core.errors import Interrupted

    class Store:
        def __init__(self, fail: bool) -> None:
            self.fail, self.data = fail, {}

        def set(self, key, value):
            self.data[key] = value

        def check(self, keys):
            if self.fail:
                raise RuntimeError("Connection reset by peer")
            return all(k in self.data for k in keys)

    with pytest.raises(Interrupted) as stop:
        agree(Store(False), 1, 2, {"--dp": 2}, lambda i, _: f"host {i}", 60, interrupted=lambda: 15)
    assert stop.value.signum == 15
    with pytest.raises(UserError, match=r"the rendezvous store stopped answering .*\(RuntimeError\)"):
        agree(Store(True), 1, 2, {"--dp": 2}, lambda i, _: f"host {i}", 60)
    with pytest.raises(UserError, match="host 0 did not start within 0 s"):
        agree(Store(False), 1, 2, {"--dp": 2}, lambda i, _: f"host {i}", 0.1)
