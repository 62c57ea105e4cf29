"""Training progress for the person watching: a bar on a terminal, one plain line now and then otherwise.

A progress bar redraws itself with carriage returns; in a CI log, a ``nohup`` file or a notebook's saved
output that becomes thousands of fragments. Without a terminal, :class:`Progress` writes one complete
line every ``every`` steps instead, and :func:`quiet_library_bars` turns off the bars transformers and
the Hub draw when they load weights ("Loading weights ..."). Both are called by a run's entry point, never
at import, so a program embedding convlora keeps its own settings.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (``False`` for files, pipes and anything without ``isatty``)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def quiet_library_bars(streams: tuple[Any, ...] | None = None) -> bool:
    """Turn off transformers' and huggingface_hub's progress bars unless both output streams are terminals.

    Args:
        streams: the streams to check; ``(sys.stdout, sys.stderr)`` by default.

    Returns:
        ``True`` when the bars were turned off.

    >>> import io
    >>> quiet_library_bars((io.StringIO(),))  # doctest: +SKIP
    True
    """
    streams = (sys.stdout, sys.stderr) if streams is None else streams
    if all(is_terminal(stream) for stream in streams):
        return False
    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    return True


class Progress:
    """Progress of a training run: a tqdm bar on a terminal, plain lines every ``every`` steps otherwise.

    Args:
        total: optimiser steps of the whole run.
        initial: steps already done (a resumed run).
        enabled: ``False`` writes nothing at all (other processes, ``--no-progress``); ``write`` still prints.
        every: steps between plain lines (``log_every_steps``); the last step always gets one.
        stream: where to write; ``sys.stdout`` by default.
        interactive: force the bar (``True``) or the plain lines (``False``); by default a bar only on a terminal.

    >>> import io
    >>> out = io.StringIO()
    >>> progress = Progress(total=4, every=2, stream=out)
    >>> for _ in range(4):
    ...     progress.update({"loss": 0.5}, lr=1e-3, img_s=8.0)
    >>> progress.close()
    >>> [line.split("  ")[0] for line in out.getvalue().splitlines()]
    ['train step 2/4 (50%)', 'train step 4/4 (100%)']
    """

    def __init__(
        self,
        total: int,
        initial: int = 0,
        enabled: bool = True,
        *,
        every: int = 10,
        stream: TextIO | None = None,
        interactive: bool | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.total, self.step, self.every, self.enabled = total, initial, every, enabled
        self.stream = sys.stdout if stream is None else stream
        self.interactive = is_terminal(self.stream) if interactive is None else interactive
        self._start_step, self._started = initial, time.time()
        self._last_line: int | None = None
        self._last_text = ""
        self._bar = None
        if enabled and self.interactive:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", file=self.stream)

    def update(
        self,
        losses: dict[str, float] | None = None,
        lr: float | None = None,
        img_s: float | None = None,
        steps: int = 1,
    ) -> None:
        """Count ``steps`` optimiser steps and show the latest losses, learning rate and images per second.

        Args:
            losses: the step's losses by name (``"loss"`` is shown).
            lr: the learning rate.
            img_s: images per second (all processes).
            steps: steps taken since the last call.
        """
        self.step += steps
        if not self.enabled:
            return
        fields = _fields(losses, lr, img_s)
        if self._bar is not None:
            self._bar.set_postfix(fields, refresh=False)
            self._bar.update(steps)
            return
        self._last_text = "  ".join(f"{k} {v}" for k, v in fields.items())
        if self.step % self.every == 0 or self.step >= self.total:
            self._line()

    def write(self, text: str) -> None:
        """A message for the reader (under the bar on a terminal); written even when progress is disabled."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """Finish the bar, or write the last step's line if it was not written yet."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self._last_text and self._last_line != self.step:
            self._line()

    def _line(self) -> None:
        elapsed = time.time() - self._started
        done = self.step - self._start_step
        percent = 100 * self.step / max(1, self.total)
        parts = [f"train step {self.step}/{self.total} ({percent:.0f}%)"]
        if self._last_text:
            parts.append(self._last_text)
        parts.append(f"elapsed {_clock(elapsed)}")
        if done > 0 and self.step < self.total:
            parts.append(f"left ~{_clock(elapsed / done * (self.total - self.step))}")
        print("  ".join(parts), file=self.stream, flush=True)
        self._last_line = self.step


def _fields(losses: dict[str, float] | None, lr: float | None, img_s: float | None) -> dict[str, str]:
    fields = {}
    if losses and "loss" in losses:
        fields["loss"] = f"{losses['loss']:.4f}"
    if lr is not None:
        fields["lr"] = f"{lr:.2e}"
    if img_s is not None:
        fields["img_s"] = f"{img_s:.1f}"
    return fields


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
