"""Shared fixtures: tiny checkpoints built once per session."""

from __future__ import annotations

import os

import pytest
import torch

# keep CPU tests quick and deterministic on a 2-core machine
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    """Returns a builder: ckpt(family, **kwargs) -> folder, cached per argument set."""
    from tests.checkpoints import make_checkpoint

    root = tmp_path_factory.mktemp("ckpts")
    cache: dict = {}

    def build(family: str, **kwargs):
        key = (family, tuple(sorted(kwargs.items(), key=lambda kv: kv[0])))
        if key not in cache:
            name = f"{family}_{len(cache)}"
            cache[key] = make_checkpoint(family, root / name, **kwargs)
        return cache[key]

    return build
