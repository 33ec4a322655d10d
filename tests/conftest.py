"""Shared fixtures: tiny checkpoints built once per session."""

from __future__ import annotations

import pytest
import torch

# one thread: tiny models gain nothing from more, and spawned ranks must not oversubscribe 2 cores
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    """Returns a builder: ckpt(family, **kwargs) -> folder, cached per argument set."""
    from tests.checkpoints import make_checkpoint

    root = tmp_path_factory.mktemp("ckpts")
    cache: dict = {}

    def build(family: str, **kwargs):
        key = (family, repr(sorted(kwargs.items(), key=lambda kv: kv[0])))
        if key not in cache:
            name = f"{family}_{len(cache)}"
            cache[key] = make_checkpoint(family, root / name, **kwargs)
        return cache[key]

    return build
