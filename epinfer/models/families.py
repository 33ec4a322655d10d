"""The per-family checkpoint names: how a family's tensor names differ from the shared decoder's
parameter tree (`models.causal_lm`). `core.config.ARCHITECTURES` maps an architecture name to its
family; a family missing here uses the Qwen-style names as they are.

A new family whose checkpoint calls things differently adds a rename here (and, when a tensor must
be split or regrouped, a loader in `models.loader`, as Qwen3-Next's grouped GDN projections have).
"""

from __future__ import annotations

import re
from collections.abc import Callable

_MIXTRAL_W = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_MIXTRAL_EXPERT = re.compile(r"\.experts\.(\d+)\.(w[123])\.")


def _mixtral(key: str) -> str:
    """`block_sparse_moe.experts.E.w1/w2/w3` -> `mlp.experts.E.gate_proj/down_proj/up_proj`."""
    key = key.replace(".block_sparse_moe.", ".mlp.")
    return _MIXTRAL_EXPERT.sub(lambda m: f".experts.{m[1]}.{_MIXTRAL_W[m[2]]}.", key)


WEIGHT_RENAMES: dict[str, Callable[[str], str]] = {
    "mixtral": _mixtral,
}
