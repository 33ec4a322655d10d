"""`--check-numerics`: NaN / Inf checks of every layer's outputs, real and padding rows apart,
and warnings for degenerate generations (NaN logits; one token repeated for the whole completion,
the `!!!!` symptom: argmax of an all-NaN row is token 0, `!` in Qwen vocabularies).
Costs a device-to-host sync per check: a debugging mode."""

from __future__ import annotations


class NumericsMonitor:
    """Attached to a model as forward hooks (`attach`): every decoder layer's mixer output
    (`layer.N.attn` / `layer.N.gdn`) and MLP output (`layer.N.moe` / `layer.N.mlp`) is checked."""

    def __init__(self) -> None:
        self.first_real: tuple[str, int] | None = None  # (op, step) where real rows first go bad
        self.first_pad: tuple[str, int] | None = None
        self.batch = None  # the forward batch of the layer running now

    def attach(self, model) -> None:
        for i, layer in enumerate(model.model.layers):
            layer.register_forward_pre_hook(self._remember_batch)
            mixer = layer.self_attn if layer.mixer_type == "attention" else layer.linear_attn
            mixer.register_forward_hook(self._hook(f"layer.{i}.{'attn' if layer.mixer_type == 'attention' else 'gdn'}"))
            kind = "mlp" if type(layer.mlp).__name__ == "GatedMLP" else "moe"
            layer.mlp.register_forward_hook(self._hook(f"layer.{i}.{kind}"))

    def _remember_batch(self, layer, args) -> None:
        self.batch = args[2]  # DecoderLayer.forward(x, residual, batch, ...)

    def _hook(self, op: str):
        def check(module, args, out) -> None:
            h = out.sum(1) if out.dim() == 3 else out  # the experts' unsummed per-pair outputs
            self.check(op, h, self.batch.num_real_rows, self.batch.step_id)
        return check

    def check(self, op: str, x_TD, real_rows: int, step: int) -> None:
        import torch  # (this module is imported by the command line, which must start fast)

        if self.first_real is None and real_rows and not torch.isfinite(x_TD[:real_rows]).all():
            self.first_real = (op, step)
        has_pad = real_rows < x_TD.shape[0]
        if self.first_pad is None and has_pad and not torch.isfinite(x_TD[real_rows:]).all():
            self.first_pad = (op, step)

    def report(self) -> list[str]:
        lines = []
        if self.first_real:
            lines.append(f"check-numerics: NaN/Inf first reached real rows at {self.first_real[0]} "
                         f"(step {self.first_real[1]})")
        if self.first_pad:
            lines.append(f"check-numerics: padding rows non-finite from {self.first_pad[0]} "
                         f"(step {self.first_pad[1]}; expected with --poison-pads)")
        return lines


def degenerate_warnings(outputs) -> list[str]:
    """Per request: NaN logits seen, or one token repeated for the whole completion (>= 4 tokens)."""
    lines = []
    for i, out in enumerate(outputs):
        if getattr(out, "nan_logits", False):
            lines.append(f"request {i}: NaN logits during generation (the request failed)")
        if len(out.token_ids) >= 4 and len(set(out.token_ids)) == 1:
            lines.append(f"request {i}: degenerate output: token {out.token_ids[0]} repeated "
                         f"{len(out.token_ids)} times")
    return lines
