"""Per-request sampling and stopping parameters."""

from __future__ import annotations

import dataclasses

from epinfer.errors import UserError


@dataclasses.dataclass
class SamplingParams:
    """`None` means "the model's generation_config.json default, else the built-in default"."""

    max_tokens: int | None = None  # default 64
    temperature: float | None = None  # default 1.0; 0 = greedy
    top_p: float | None = None  # default 1.0
    top_k: int | None = None  # default 0 (off); -1 also means off
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False

    def resolved(self, defaults: dict) -> SamplingParams:
        """A copy with every None replaced by `defaults` or the built-in default, validated."""
        def pick(name: str, builtin):
            value = getattr(self, name)
            if value is None:
                value = defaults.get(name)
            return builtin if value is None else value

        stop = self.stop
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        out = SamplingParams(
            max_tokens=int(pick("max_tokens", 64)),
            temperature=float(pick("temperature", 1.0)),
            top_p=float(pick("top_p", 1.0)),
            top_k=int(pick("top_k", 0)),
            seed=self.seed,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=bool(self.ignore_eos),
        )
        out.validate()
        return out

    def validate(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UserError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature is not None and self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < -1:
            raise UserError(f"top_k must be -1, 0 (off) or positive, got {self.top_k}")
        if any(not isinstance(s, str) or not s for s in (self.stop or [])):
            raise UserError("stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
