"""A stand-in for CUDA graphs on a CPU, through CUDAGraphStep's public GraphBackend seam.

Capture runs the step's Python once and undoes its tensor work (a real capture runs no
kernel); replay runs the step again (its device work, as a CUDA graph replays it). As on
CUDA, a replay reads only a learning rate that is a float32 tensor on the device; any other
lr (a Python number, a tensor elsewhere or in another dtype) is read once, at capture, and
every replay steps with that value. Used by the CUDA-graph, doctor and EMA tests to drive
the graph path without a GPU.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterable

import torch

from hlbd_fast.strategies.cuda_graph import GraphBackend, SyncFinding


def read_at_replay(lr: Any, device: torch.device) -> bool:
    """Whether a CUDA graph's replay reads ``lr`` afresh (a float32 tensor on the device), as fused/capturable steps do."""
    return isinstance(lr, torch.Tensor) and lr.device == device and lr.dtype == torch.float32


class StandInGraph:
    """Replays the captured step: its work again, as a CUDA graph does, with the lrs baked at capture."""

    def __init__(self, step: Callable[[], None], baked: list[tuple[dict, float]], replayed: Callable[[], None]) -> None:
        self.step, self.replays = step, 0
        self.baked, self.replayed = baked, replayed

    def replay(self) -> None:
        saved = [g["lr"] for g, _ in self.baked]
        for g, value in self.baked:
            g["lr"] = value  # the value read at capture, as a CUDA kernel that read it on the host keeps it
        try:
            self.replayed()
            self.step()
        finally:
            for (g, _), lr in zip(self.baked, saved):
                g["lr"] = lr
        self.replays += 1


class StandInBackend(GraphBackend):
    """CUDA graphs on a CPU.

    Args:
        fail: capture raises this message.
        syncs: what sync detection reports, warm-up by warm-up (``None``: no sync).
        broken: what the probe after a failed capture reports (``None``: the process is fine).
        extra_state: more tensors a capture must leave as it found them (e.g. EMA's average).
        watch: a ``sys.setprofile`` function active while a step is captured.
        capturable: switch the optimizer's param groups to ``capturable=True`` as on CUDA (for an
            optimizer whose capturable step runs on a CPU; torch's Adam refuses it there).
    """

    def __init__(
        self,
        fail: str | None = None,
        syncs: Iterable[str | None] = (),
        broken: str | None = None,
        extra_state: Callable[[], list[torch.Tensor]] | None = None,
        watch: Any = None,
        capturable: bool = False,
    ) -> None:
        super().__init__()
        self.fail, self.findings, self.broken = fail, iter(syncs), broken
        self.extra_state, self.watch, self.capturable = extra_state, watch, capturable
        self.graphs: list[StandInGraph] = []
        self.trainer: Any = None  # set once the trainer exists
        self.replayed_lrs: list[tuple[int, float]] = []  # (global step, lr of the first group) the replays stepped with

    def __deepcopy__(self, memo: dict) -> "StandInBackend":
        return self  # the doctor copies its strategies; the test reads what this one saw

    def unavailable(self, device: torch.device) -> str | None:
        return None

    def usable_after_failure(self, device: torch.device) -> str | None:
        return self.broken

    def side_stream(self, device: torch.device) -> Any:
        return contextlib.nullcontext()

    def detect_syncs(self) -> Any:
        return contextlib.nullcontext(SyncFinding(next(self.findings, None)))

    def make_capturable(self, optimizer: torch.optim.Optimizer) -> None:
        if self.capturable:
            super().make_capturable(optimizer)
        # else: nothing; torch's CPU Adam refuses capturable=True

    def _state(self) -> list[torch.Tensor]:
        t = self.trainer
        extra = self.extra_state() if self.extra_state is not None else []
        return [
            *t.model.parameters(),
            t.meter.values,
            t.meter.step_index,
            *extra,
            *(v for st in t.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)),
        ]

    def capture(self, device: torch.device, step: Callable[[], None]) -> StandInGraph:
        if self.fail:
            raise RuntimeError(self.fail)
        tensors = self._state()
        saved = [x.detach().clone() for x in tensors]
        rng = torch.get_rng_state()
        previous = sys.getprofile()
        if self.watch is not None:
            sys.setprofile(self.watch)
        try:
            step()
        finally:
            sys.setprofile(previous)
        with torch.no_grad():
            for x, v in zip(tensors, saved):
                x.copy_(v)
        torch.set_rng_state(rng)
        groups = self.trainer.optimizer.param_groups
        baked = [(g, float(g["lr"])) for g in groups if not read_at_replay(g["lr"], device)]
        self.graphs.append(StandInGraph(step, baked, self._record_lr))
        return self.graphs[-1]

    def _record_lr(self) -> None:
        t = self.trainer
        self.replayed_lrs.append((t.global_step, float(t.optimizer.param_groups[0]["lr"])))
