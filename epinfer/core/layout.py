"""The run layout as the command line gives it, checked before any process starts: DP × TP, the
dispatcher and padding names, and what a model's `config.json` says TP must divide. Pure functions
(no torch), so `epinfer` answers a bad layout in well under two seconds."""

from __future__ import annotations

from epinfer.core.config import ModelConfig
from epinfer.core.errors import UserError

DISPATCHERS = ("agrs", "alltoall", "naive")  # distributed.dispatch maps each to its class
PADDING_MODES = ("uniform", "none")


def check_layout(dp: int, tp: int, world_size: int | None = None) -> None:
    if dp < 1 or tp < 1:
        raise UserError(f"--dp and --tp must be >= 1 (got dp={dp}, tp={tp})")
    if world_size is not None and world_size != dp * tp:
        raise UserError(f"WORLD_SIZE={world_size} but --dp {dp} × --tp {tp} = {dp * tp}")


def check_model_layout(cfg: ModelConfig, dp: int, tp: int, expert_parallel: bool = True) -> None:
    """What `config.json` and the layout flags decide on their own, checked before any process starts
    (the launcher) and again by every engine: head and intermediate counts that TP must split. A
    `UserError` names the first thing that does not divide."""
    if tp == 1:
        return
    if cfg.num_heads % tp:
        raise UserError(f"attention heads ({cfg.num_heads}) are not divisible by --tp {tp}")
    if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
        raise UserError(f"KV heads ({cfg.num_kv_heads}) and --tp {tp}: one must divide the other")
    if cfg.qk_norm == "full":
        raise UserError(f"{cfg.family} (q/k norm over all heads) does not support --tp > 1 yet")
    if cfg.is_hybrid and (cfg.linear_num_key_heads % tp or cfg.linear_num_value_heads % tp):
        raise UserError(f"linear-attention heads ({cfg.linear_num_key_heads} key, {cfg.linear_num_value_heads} "
                        f"value) are not divisible by --tp {tp}")
    has_moe = "moe" in cfg.mlp_types
    if "dense" in cfg.mlp_types and cfg.intermediate_size % tp:
        raise UserError(f"MLP intermediate size ({cfg.intermediate_size}) is not divisible by --tp {tp}")
    if has_moe and not expert_parallel and cfg.moe_intermediate_size % tp:
        raise UserError(f"expert intermediate size ({cfg.moe_intermediate_size}) is not divisible by --tp {tp}")
    # the shared expert is TP-sharded where the MoE has no dispatcher (no EP, or EP inside one replica)
    if has_moe and cfg.shared_expert_intermediate_size and (not expert_parallel or dp == 1) \
            and cfg.shared_expert_intermediate_size % tp:
        raise UserError(f"MLP intermediate size ({cfg.shared_expert_intermediate_size}) is not divisible by --tp {tp}")
