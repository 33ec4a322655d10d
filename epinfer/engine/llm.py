"""`LLM`: the offline Python API (`LLM(model=...).generate(prompts, params)`)."""

from __future__ import annotations

import numbers
import threading
from collections.abc import Sequence as Seq

from epinfer.core.env import check_switches
from epinfer.core.errors import UserError
from epinfer.core.sampling_params import SamplingParams
from epinfer.engine.engine import Engine, EngineConfig, RequestOutput


class LLM:
    def __init__(self, model: str | None = None, engine: EngineConfig | None = None, **engine_kwargs) -> None:
        """`LLM(model, dtype=..., ...)` (EngineConfig's fields), or `LLM(engine=EngineConfig(...))`."""
        if engine is not None and (model is not None or engine_kwargs):
            raise UserError("give either an EngineConfig or the model and engine keywords, not both")
        check_switches()
        self._running = threading.Lock()  # one generate at a time
        self.engine = Engine(engine or EngineConfig(model=model, **engine_kwargs))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def _loop(self, seqs: list, progress) -> None:
        """Submits `seqs` and steps until every request ends."""
        done = 0
        try:
            for seq in seqs:
                self.engine.submit(seq)
            if progress is not None:
                progress(0, 0, 0)  # generation starts: rates are measured from here
            while self.engine.has_work():
                done += len(self.engine.step())
                if progress is not None:
                    progress(done, sum(min(s.num_computed, len(s.prompt_ids)) for s in seqs),
                             sum(len(s.output_ids) for s in seqs))
        except BaseException:  # (an interrupt too): this call's requests end, the next call starts clean
            self.engine.abandon(seqs)
            raise

    def generate(self, prompts: str | list[int] | Seq[str | list[int]],
                 params: SamplingParams | Seq[SamplingParams] | None = None,
                 progress=None) -> list[RequestOutput]:
        """Outputs in input order. `prompts`: strings or token-id lists (or one of either).
        `progress(requests_done, prompt_tokens_done, tokens_generated)` is called once with zeros as
        generation starts, then after every step, when given."""
        prompts = prompt_list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if not isinstance(params, (list, tuple)) or not all(p is None or isinstance(p, SamplingParams)
                                                             for p in params):
            raise UserError("params must be a SamplingParams or a list of them (one per prompt), got "
                            f"{type(params).__name__}{' of other types' if isinstance(params, (list, tuple)) else ''}")
        params = list(params)
        if len(params) != len(prompts):
            raise UserError(f"{len(params)} sampling params for {len(prompts)} prompts")
        if not self._running.acquire(blocking=False):  # (another thread, or the progress callback)
            raise UserError("generate is already running on this LLM: call it from one thread at a time")
        try:
            seqs = [self.engine.make_request(p, sp, i)
                    for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
            self._loop(seqs, progress)
        finally:
            self._running.release()
        return [self.engine.output(s) for s in seqs]


def prompt_list(prompts) -> list:
    """`generate`'s prompts as a list, each a string or a sequence of token ids: one prompt (a
    string, a list or tuple of ints) or a list / tuple of them; vLLM's forms {"prompt": text} and
    {"prompt_token_ids": ids} are taken too. Any other container (a dict's keys, a set's arbitrary
    order) would silently run something else: a one-line error."""
    def one(p):
        if isinstance(p, dict):
            keys = set(p)
            if keys == {"prompt"} or keys == {"prompt_token_ids"}:
                return p[keys.pop()]
            raise UserError("a prompt given as a dict takes one key, 'prompt' or 'prompt_token_ids'; got "
                            f"{sorted(keys)}")
        return p

    if isinstance(prompts, (str, dict)) or (isinstance(prompts, (list, tuple)) and prompts
                                            and all(isinstance(t, numbers.Integral) and not isinstance(t, bool)
                                                    for t in prompts)):
        return [one(prompts)]
    if not isinstance(prompts, (list, tuple)):
        raise UserError("prompts must be a string, a list of token ids or a list of those, got "
                        f"{type(prompts).__name__}")
    return [one(p) for p in prompts]
