"""Fault injection, for tests and demos only (reached only through `--fault`): a communicator
plugin (`distributed.communicator`'s extension points) plus, for `leak-pad`, a forward pre-hook on
the first MoE block, attached by the runtime to the one faulty rank. No production module knows it.

One rank (`--fault-rank`, a global rank) breaks the lockstep contract at one step
(`--fault-step`, a DP step id) in a chosen way, so tests can prove the diagnosis is right:
  skip-collective  skips the first collective of its next MoE dispatch
  wrong-size       sends one row more in that collective (after the always-on size check)
  reorder          issues the collective that follows the dispatch first, with a zero buffer
  delay            sleeps `--fault-delay` seconds before its MoE dispatch
  leak-pad         broken padding: NaN-poisoned pad rows reach real rows from step S on
  kill             exits abruptly (SIGKILL) at step S
  nan-logits       a TP leader's first sampled row gets NaN logits at step S (that request alone fails)
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

KINDS = ("skip-collective", "wrong-size", "reorder", "delay", "leak-pad", "kill", "nan-logits")


@dataclasses.dataclass
class FaultInjector:
    kind: str
    step: int
    delay: float = 2.0
    triggered: bool = False
    pending: str | None = None  # a one-shot action for the next device collective

    def at_step(self, step: int) -> None:
        if self.kind == "kill" and step == self.step:
            self.triggered = True
            os.kill(os.getpid(), signal.SIGKILL)

    def at_logits(self, step: int, logits):
        """The logits to sample from (a copy: the runner's are inference tensors)."""
        if self.kind == "nan-logits" and step == self.step and logits.shape[0] > 0:
            self.triggered = True
            logits = logits.clone()
            logits[0] = float("nan")
        return logits

    def leak_pads(self, module, args):
        """Forward pre-hook of the first MoE block (`leak-pad`): from step S on, padding rows bleed
        into real rows (NaN when there is no padding row to take them from)."""
        x_TD, batch = args[0], args[1]
        if self.kind != "leak-pad" or batch.step_id < self.step:
            return None
        import torch

        self.triggered = True
        real = batch.num_real_rows
        leak = x_TD[real:].sum(0) if real < x_TD.shape[0] else torch.full_like(x_TD[0], float("nan"))
        return (torch.cat([x_TD[:real] + leak, x_TD[real:]]), *args[1:])

    def at_moe_dispatch(self, step: int, dispatcher, x, sizes) -> None:
        if self.triggered or step != self.step:
            return
        if self.kind == "delay":
            self.triggered = True
            time.sleep(self.delay)
        elif self.kind == "reorder":
            self.triggered = True
            dispatcher.combine_probe(x, sizes)
        elif self.kind in ("skip-collective", "wrong-size"):
            self.triggered = True
            self.pending = self.kind

    def payload(self, op: str, label: str, step: int, x):
        """What the next device collective after the chosen dispatch sends (None: skipped)."""
        action, self.pending = self.pending, None
        if action == "skip-collective":
            return None
        if action == "wrong-size":
            import torch

            return torch.cat([x, x.new_zeros((1, *x.shape[1:]))])
        return x

    def report(self, last_step: int) -> str | None:
        if self.triggered:
            return None
        return (f"fault {self.kind} at step {self.step} was not triggered "
                f"(the run ended at step {last_step})")
