"""`host: local`: the controller is the device; commands run under `sh -c`."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time

from deployer.config.inventory import Device
from deployer.connect.channel import READ_CHUNK, STDERR_TAIL, BufferedReader
from deployer.connect.deadline import Deadline, current_deadline, raise_if_expired
from deployer.errors import CommandTimeout, TransportError


class LocalChannel(BufferedReader):
    """A command run by `sh -c` on the controller, with the same interface as an SSH channel."""

    def __init__(self, command: str, what: str, timeout: float, deadline: Deadline | None = None) -> None:
        super().__init__(what, timeout)
        self._process = subprocess.Popen(
            ["sh", "-c", command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=deadline is not None,  # so that the deadline can stop all of it
        )
        self.bytes_sent = 0
        self._deadline = deadline
        self._stderr, self._stderr_ended = bytearray(), False
        # At the deadline the command is killed (only signalled: the worker thread still owns the pipes).
        self._unwatch = deadline.on_expiry(self._kill_group) if deadline else None

    def _kill_group(self) -> None:
        if self._process.poll() is not None:
            return  # ended: its group id may belong to someone else by now
        try:
            os.killpg(self._process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _recv(self, size: int, wait: float) -> bytes:
        assert self._process.stdout is not None and self._process.stderr is not None
        fd, err = self._process.stdout.fileno(), self._process.stderr.fileno()
        end = time.monotonic() + max(wait, 0.0)
        while True:  # stderr is drained as it comes (a full pipe would stall the command), its tail kept
            watched = [fd] if self._stderr_ended else [fd, err]
            ready, _, _ = select.select(watched, [], [], max(end - time.monotonic(), 0.0))
            if not ready:
                raise CommandTimeout(f"{self._what}: no answer within {self._timeout:g} s")
            if fd in ready:
                break
            self._keep_stderr(os.read(err, READ_CHUNK))
        chunk = os.read(fd, size)
        if not chunk:
            raise_if_expired(self._deadline)
        return chunk

    def write(self, data: bytes) -> None:
        assert self._process.stdin is not None
        try:
            self._process.stdin.write(data)
            self._process.stdin.flush()
        except BrokenPipeError as exc:
            raise_if_expired(self._deadline, exc)
            raise TransportError(f"{self._what}: the command closed its input") from exc
        self.bytes_sent += len(data)

    def close_input(self) -> None:
        assert self._process.stdin is not None
        try:
            self._process.stdin.close()
        except BrokenPipeError:
            pass

    def finish(self, timeout: float) -> tuple[int | None, str]:
        try:
            status: int | None = self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            status = None
        assert self._process.stderr is not None
        if status is not None and not self._stderr_ended:
            self._keep_stderr(self._process.stderr.read())
        return status, self._stderr[-4096:].decode("utf-8", "replace")

    def _keep_stderr(self, data: bytes) -> None:
        self._stderr_ended = self._stderr_ended or not data
        self._stderr += data
        del self._stderr[:-STDERR_TAIL]

    def close(self) -> None:
        if self._unwatch is not None:
            self._unwatch()
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        for stream in (self._process.stdin, self._process.stdout, self._process.stderr):
            if stream is not None:
                stream.close()


class LocalTransport:
    """`host: local`: the controller is the device; commands run under `sh -c`."""

    def __init__(self, device: Device) -> None:
        self._device = device

    def exec(self, command: str) -> LocalChannel:
        return LocalChannel(command, f"device {self._device.name!r}", self._device.timeouts.command,
                            current_deadline())

    def close(self) -> None:
        pass
