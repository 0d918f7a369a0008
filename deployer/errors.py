"""The exception tree of deployer; every error a user can see is one of these.

```
DeployError                       exit 1
├── InputError                    exit 2: bad inventory, playbook, kernels manifest, flag; found before any device
│   ├── InventoryError                  carries file:line, device, field
│   └── PlaybookError                   carries file:line, field
├── DeviceError                   exit 1: carries the device; caught per device, never stops the fleet
│   ├── TransportError
│   │   ├── ConnectError                refused, unreachable, timed out, no SSH banner (`transient`: retried)
│   │   ├── AuthError                   no key accepted
│   │   ├── HostKeyError                unknown or changed host key
│   │   ├── CommandTimeout              the agent did not answer in time
│   │   └── DeadlineExceeded            the device's whole run took longer than its deadline
│   ├── AgentError                      the agent failed or replied something malformed
│   │   └── CompileError                a program failed to build: log tail
│   └── SmokeMismatch                   outputs differ from the numpy reference beyond tolerance
├── LocalStateError               exit 3: local state (the cache, the history) cannot be used; nothing half-done
│   └── HistoryError                    history.db is not usable (corrupt, newer schema, read-only, locked) or a
│                                       write to it failed (rolled back whole)
└── SimError                      exit 1: the simulated fleet (`deploy sim`) could not be started or stopped
```

Messages are lower-case, name where (`file:line`), the device and the field, and the fix when known.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Where:
    """A place in an input file; `line` counts from 1 (0 when unknown)."""

    file: str
    line: int = 0

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


class DeployError(Exception):
    exit_code = 1


class InputError(DeployError):
    """Input that is wrong before any device is touched."""

    exit_code = 2

    def __init__(
        self, where: Where | None, field: str | None, problem: str, *, device: str | None = None
    ) -> None:
        self.where, self.field, self.device, self.problem = where, field, device, problem
        parts = [str(where)] if where else []
        if device:
            parts.append(f"device {device!r}")
        if field:
            parts.append(f"field {field!r}")
        parts.append(problem)
        super().__init__(": ".join(parts))


class InventoryError(InputError):
    pass


class PlaybookError(InputError):
    """A playbook (`deploy run PLAYBOOK`) that is wrong: file:line of the offending node, and the field."""


class DeviceError(DeployError):
    """A failure of one device; `stage` says where in its run it happened."""

    exit_code = 1

    def __init__(self, message: str, *, device: str = "", stage: str = "") -> None:
        self.device, self.stage, self.message = device, stage, message
        super().__init__(message)

    @property
    def reason(self) -> str:
        """What a summary says of this failure."""
        return self.message

    def for_device(self, device: str, stage: str) -> DeviceError:
        """Attach the device and stage where the error is caught, keeping what is already known."""
        self.device = self.device or device
        self.stage = self.stage or stage
        return self


class TransportError(DeviceError):
    pass


class ConnectError(TransportError):
    """Reaching the device failed before any session started; `transient` ones are worth another try."""

    transient = True


class AuthError(TransportError):
    pass


class HostKeyError(TransportError):
    pass


class CommandTimeout(TransportError):
    pass


class DeadlineExceeded(TransportError):
    """The device's deadline (`timeouts.device`, `--deadline`) ended its run: its connection was closed."""


class AgentError(DeviceError):
    """The agent replied with an error, or something that breaks the contract."""

    def __init__(self, message: str, *, kind: str = "bad_reply", device: str = "", stage: str = "") -> None:
        self.kind = kind
        super().__init__(message, device=device, stage=stage)

    @property
    def reason(self) -> str:
        return f"{self.message} [{self.kind}]"


class CompileError(AgentError):
    pass


class SmokeMismatch(DeviceError):
    pass


class LocalStateError(DeployError):
    exit_code = 3


class HistoryError(LocalStateError):
    """`history.db` (deployer.history) cannot be used: not a SQLite database or corrupt, a schema newer than this
    deployer, read-only, locked by another writer; or a write failed, and was rolled back whole. Opening checks all
    of it before any board is touched, and never changes a file it refuses."""


class SimError(DeployError):
    """`deploy sim`: a server, proxy or network namespace of the simulated fleet failed (not the local cache)."""

    exit_code = 1


class Interrupted(BaseException):
    """Ctrl-C (SIGINT), raised in the main thread by the CLI's handler: a BaseException, as KeyboardInterrupt
    is, so that no `except Exception` takes it for an error; `deploy` exits 130 after cleaning up."""
