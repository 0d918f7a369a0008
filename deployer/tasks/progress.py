"""What a fleet command shows while it runs: a live table on a terminal, plain lines otherwise, or nothing.

The workers call `stage` as each stage of a device starts, `traffic` once the device's session exists (a
function the display polls for bytes sent and received), and `finished` at the end. Every method is
called from worker threads; the displays lock what they share. Progress goes to stderr: stdout carries
only the summary or the JSON.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from rich.console import Console, Group


class Screen(Protocol):
    """Where progress goes: a Rich console, or one made on first use (cli/app.py `LazyConsole`): plain lines
    need only its file, so a run off a terminal never imports Rich."""

    @property
    def file(self) -> IO[str]: ...

    @property
    def is_terminal(self) -> bool: ...


Traffic = Callable[[], tuple[int, int]]  # (bytes sent, bytes received) so far


class Progress:
    """The interface, and the display of `--quiet`: shows nothing."""

    def stage(self, device: str, stage: str) -> None:
        pass

    def traffic(self, device: str, counter: Traffic) -> None:
        pass

    def finished(self, device: str, ok: bool, detail: str | None = None) -> None:
        pass

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 trace: TracebackType | None) -> None:
        pass


class PlainProgress(Progress):
    """One line per event, for logs and CI: `[  1.2s] pi-01 compile`."""

    def __init__(self, console: Screen) -> None:
        self.console = console
        self.started = time.monotonic()
        self.lock = threading.Lock()

    def _line(self, text: str) -> None:
        # written as is, not through Rich: a log wants no wrapping and no colour, and Rich's rendering cost
        # ~2 ms a line (the whole of a no-op's progress on 8 boards was ~70 ms of CPU)
        with self.lock:
            self.console.file.write(f"[{time.monotonic() - self.started:6.1f}s] {text}\n")
            self.console.file.flush()

    def stage(self, device: str, stage: str) -> None:
        self._line(f"{device} {stage}")

    def finished(self, device: str, ok: bool, detail: str | None = None) -> None:
        self._line(f"{device} {'passed' if ok else 'failed'}" + (f": {detail}" if detail else ""))


@dataclass(slots=True)
class _Row:
    stage: str = "waiting"
    started: float | None = None
    ended: float | None = None
    ok: bool | None = None
    counter: Traffic | None = None
    last_bytes: tuple[int, int] = (0, 0)
    detail: str = field(default="")


class LiveProgress(Progress):
    """A table redrawn a few times a second: a row per device (stage, bytes, elapsed) and an overall bar."""

    def __init__(self, console: Screen, devices: Sequence[str], title: str) -> None:
        from rich.live import Live

        self.console: Console = getattr(console, "console", console)  # type: ignore[arg-type]  # LazyConsole's
        self.title = title
        self.rows = {name: _Row() for name in devices}
        self.lock = threading.Lock()
        self.live = Live(console=self.console, transient=True, refresh_per_second=4, get_renderable=self._render)

    def __enter__(self) -> Progress:
        self.live.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.live.stop()

    def stage(self, device: str, stage: str) -> None:
        with self.lock:
            row = self.rows.setdefault(device, _Row())
            row.stage = stage
            row.started = row.started or time.monotonic()

    def traffic(self, device: str, counter: Traffic) -> None:
        with self.lock:
            self.rows.setdefault(device, _Row()).counter = counter

    def finished(self, device: str, ok: bool, detail: str | None = None) -> None:
        with self.lock:
            row = self.rows.setdefault(device, _Row())
            row.last_bytes = _read(row)
            row.ok, row.ended, row.counter, row.detail = ok, time.monotonic(), None, detail or ""

    def _render(self) -> Group:
        from rich.console import Group
        from rich.markup import escape
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        with self.lock:
            rows = list(self.rows.items())
            done = sum(r.ok is not None for _, r in rows)
            table = Table(title=f"{self.title}: {done}/{len(rows)} done", title_justify="left", expand=False)
            for column in ("device", "stage", "sent", "received", "elapsed"):
                table.add_column(column, no_wrap=True)
            now = time.monotonic()
            for name, row in rows:
                sent, received = _read(row)
                elapsed = ((row.ended or now) - row.started) if row.started else 0.0
                failed = f"[red]failed[/red] at {escape(row.stage)}" if row.started else "[red]not started[/red]"
                stage = {True: "[green]passed[/green]", False: failed, None: escape(row.stage)}[row.ok]
                table.add_row(escape(name), stage, human_bytes(sent), human_bytes(received), f"{elapsed:.1f} s")
            bar = ProgressBar(total=max(1, len(rows)), completed=done, width=40)
        return Group(table, bar)


def _read(row: _Row) -> tuple[int, int]:
    if row.counter is None:
        return row.last_bytes
    try:
        row.last_bytes = row.counter()
    except Exception:  # a session closing under us: keep the last figure
        pass
    return row.last_bytes


def human_bytes(size: int) -> str:
    """1536 -> "1.5 KiB": the summary's and the live table's sizes."""
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def make_progress(console: Screen, devices: Sequence[str], *, title: str, quiet: bool) -> Progress:
    """The display for this run: nothing with --quiet, a live table on a terminal, plain lines otherwise."""
    if quiet:
        return Progress()
    if console.is_terminal:
        return LiveProgress(console, devices, title)
    return PlainProgress(console)
