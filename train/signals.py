"""SIGTERM / SIGINT during training: finish the current optimizer step, write a checkpoint, stop cleanly.

    with GracefulStop(world_size) as stop:
        for step in ...:
            ... one optimizer step ...
            if stop.poll():          # the signal every rank agreed on, or None
                save a checkpoint; break
    exit code: stop.exit_code        # 143 for SIGTERM, 130 for SIGINT (128 + the signal number)

The first SIGTERM or SIGINT only sets a flag (one line on stderr says so); a second one exits at once with
128 + its number, writing nothing more. Handlers are installed only in the main thread and restored on exit.

Under torchrun every rank must stop after the same step, or the others hang in the next collective. `poll`
agrees through an all-reduce (MAX) of one int over a gloo group of its own, so it never touches the GPU stream:
the reduction is started at the end of step k and its result read at the end of step k + 1 (non-blocking,
its latency hidden behind a step), so every rank stops after the same step, one step after the signal at most.
A single process reads its own flag (no collective).
"""

from __future__ import annotations

import os
import signal
import threading

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    def __init__(self, world_size: int = 1):
        self.signum: int | None = None
        self.world_size = world_size
        self._previous: dict[int, object] = {}
        self._group = None
        self._work = None
        self._buf: torch.Tensor | None = None
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")  # every rank calls this at the same point

    def arm(self) -> GracefulStop:
        """Install the handlers (main thread only; elsewhere signals keep their handlers)."""
        if threading.current_thread() is threading.main_thread() and not self._previous:
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def close(self, failed: bool = False) -> None:
        """Restore the previous handlers; complete the reduction in flight unless the run failed (the other
        ranks may be gone)."""
        if not failed:
            self.finish()
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def __enter__(self) -> GracefulStop:
        return self.arm()

    def __exit__(self, exc_type, *exc) -> None:
        self.close(failed=exc_type is not None)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            os.write(2, f"\n{name} again: exiting now, without a checkpoint\n".encode())
            os._exit(128 + signum)
        self.signum = signum
        os.write(2, f"\n{name} received: finishing the current step, then writing a checkpoint and stopping "
                    f"({'Ctrl-C' if signum == signal.SIGINT else name} again exits at once)\n".encode())

    def poll(self) -> int | None:
        """The signal to stop for, agreed by every rank (see the module docstring); None to go on."""
        if self._group is None:
            return self.signum
        agreed = None
        if self._work is not None:
            self._work.wait()
            agreed = int(self._buf.item()) or None  # a CPU tensor: no device sync
        self._buf = torch.tensor([self.signum or 0], dtype=torch.int64)
        self._work = dist.all_reduce(self._buf, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        if agreed is not None:
            self.signum = agreed
        return agreed

    def finish(self) -> None:
        """Complete the reduction in flight (every rank calls poll equally often, so each has one)."""
        if self._work is not None:
            self._work.wait()
            self._work = None

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 0 if self.signum is None else 128 + self.signum


def ignore_in_worker(_worker_id: int) -> None:
    """DataLoader worker_init_fn: workers ignore SIGTERM / SIGINT (a terminal or a scheduler signals the whole
    process group) and leave the stopping to the main process, which shuts them down."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
