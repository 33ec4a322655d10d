"""What ships for GPUs, checked without one: fla-core's autotune choices, the kernel manifests, and
where TorchInductor's cache goes."""

from __future__ import annotations

import os

import torch


def test_shipped_fla_configs_are_found_and_well_formed(monkeypatch):
    """The fla config folder of an H200 is found by its device name (fla's spelling), none for a GPU
    without one; each file is in fla's format, named by its kernel; fla's config cache module is
    pointed at it, exact matches only, unless the user configured fla (or we ship nothing)."""
    import enum
    import json
    import types

    from epinfer.kernels.gdn_prefill import fla_config_dir, use_shipped_fla_configs

    folder = fla_config_dir("NVIDIA H200")
    assert folder is not None and folder.name == "NVIDIA_H200"
    assert fla_config_dir("NVIDIA Unknown-GPU 9") is None
    files = sorted(folder.glob("*.json"))
    assert files
    for path in files:
        data = json.loads(path.read_text())
        assert data["kernel_name"] == path.stem
        configs = [entry["config"] for entry in data["autotune_entries"].values()] + [data["default_config"]]
        for cfg in configs:
            assert isinstance(cfg["kwargs"], dict) and cfg["num_warps"] in (1, 2, 4, 8, 16)
            assert cfg["num_stages"] >= 1

    class Mode(enum.Enum):  # as fla.ops.utils.cache.FlaCacheMode
        DISABLED = "disabled"
        STRICT = "strict"

    def fake_fla():
        return types.SimpleNamespace(FlaCacheMode=Mode, FLA_CACHE_MODE=Mode.DISABLED, get_fla_config_dir=lambda: None)

    for name in ("FLA_CACHE_MODE", "FLA_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    fla = fake_fla()
    assert use_shipped_fla_configs(fla, "NVIDIA H200")
    assert fla.FLA_CACHE_MODE is Mode.STRICT and fla.get_fla_config_dir() == folder
    fla = fake_fla()
    assert not use_shipped_fla_configs(fla, "NVIDIA Unknown-GPU 9") and fla.FLA_CACHE_MODE is Mode.DISABLED
    for name, value in (("FLA_CACHE_MODE", "disabled"), ("FLA_CONFIG_DIR", "/somewhere")):
        with monkeypatch.context() as env:
            env.setenv(name, value)
            fla = fake_fla()
            assert not use_shipped_fla_configs(fla, "NVIDIA H200")
            assert fla.FLA_CACHE_MODE is Mode.DISABLED and fla.get_fla_config_dir() is None


def test_inductor_cache_kept_across_reboots(tmp_path, monkeypatch):
    """TorchInductor's cache under $XDG_CACHE_HOME/epinfer/inductor unless the user chose one; left
    to inductor where that folder cannot be made."""
    from epinfer.kernels.fused import persistent_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert persistent_cache() == str(tmp_path / "epinfer" / "inductor") == os.environ["TORCHINDUCTOR_CACHE_DIR"]
    assert (tmp_path / "epinfer" / "inductor").is_dir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/chosen")
    assert persistent_cache() == "/somewhere/chosen"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # not a folder
    assert persistent_cache() is None and "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_kernel_manifest_lines(tmp_path):
    """`kernels.preload`: a manifest's variants for this Triton version, each once, ours and fla's
    only; broken lines skipped; nothing starts off CUDA (the compile itself is a GPU test)."""
    import json

    from epinfer.kernels import preload

    def line(version, module, name, data):
        return json.dumps({"triton": version, "module": module, "name": name, "data": data})

    path = tmp_path / "m.jsonl"
    ours = line("3.6.0", "epinfer.kernels.x", "k", "a")
    path.write_text("\n".join([ours, ours, line("3.5.1", "epinfer.kernels.x", "k", "b"),
                               line("3.6.0", "fla.ops.y", "Y.k", "c"), line("3.6.0", "torch._inductor.z", "k", "d"),
                               "not json", '{"triton": "3.6.0"}', ""]))
    assert preload.variants(path, "3.6.0") == [("epinfer.kernels.x", "k", "a"), ("fla.ops.y", "Y.k", "c")]
    assert preload.manifest_path("NVIDIA H200").name == "NVIDIA_H200.jsonl"
    assert preload.start(torch.device("cpu")) is None
    for shipped in preload.MANIFESTS.glob("*.jsonl"):  # every line of a shipped manifest is a variant
        lines = [ln for ln in shipped.read_text().splitlines() if ln.strip()]
        versions = {json.loads(ln)["triton"] for ln in lines}
        assert len(versions) == 1 and len(preload.variants(shipped, versions.pop())) == len(lines), shipped
