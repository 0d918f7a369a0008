"""Build sharing within one push (docs/design.md section 11, docs/inventory.md "Sharing builds").

Devices with `share_builds` that need a program with the same build key (which hashes the fingerprint id,
sources, options, MACE version and format and the agent's build modules) need the same binary. The first
device to ask for a build key claims it and compiles it; a device that asks later waits for that binary and
receives it in its build request (`given`), or finds it in the local binary store from an earlier push.
Claims are taken all at once per device, under one lock: a device waits only for keys claimed before its
own claim, so the waits form no cycle. A builder that ends without publishing (its compile failed, its
connection was lost, its deadline passed) releases its claims as failed: whoever waits on them compiles
for itself. Nobody waits longer than its `limit`. A receiving driver that refuses a shared binary stops
sharing for that fingerprint id for the rest of the push.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from deployer.cache.binaries import BinaryStore
from deployer.errors import LocalStateError


@dataclass(frozen=True, slots=True)
class Given:
    """A binary a device receives instead of compiling: `origin` is `shared from <device>` or `from store`."""

    key: str  # the program's MACE key
    binary: bytes
    sha256: str
    origin: str
    built_by: str

    def to_request(self) -> dict[str, object]:
        return {"key": self.key, "sha256": self.sha256, "size": len(self.binary), "from": self.built_by}


@dataclass(slots=True)
class Claim:
    """What one device does about the programs it must build: `given` now, wait for `waiting` (program key
    -> build key) claimed by other devices, compile `mine` (and whatever a wait does not bring)."""

    given: dict[str, Given] = field(default_factory=dict)
    waiting: dict[str, str] = field(default_factory=dict)
    mine: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # program key -> why it is compiled here after all


_FAILED = object()


class BuildShare:
    """Shared by the workers of one push; every method is thread-safe."""

    def __init__(self, store: BinaryStore | None) -> None:
        self.store = store
        self._cond = threading.Condition()
        self._owner: dict[str, str] = {}  # build key -> device that claimed it
        self._done: dict[str, Given | object] = {}  # build key -> its binary, or _FAILED
        self._stopped: dict[str, str] = {}  # fingerprint id -> why sharing stopped

    def stopped(self, fingerprint_id: str) -> str | None:
        with self._cond:
            return self._stopped.get(fingerprint_id)

    def claim(self, device: str, fingerprint_id: str, wanted: Mapping[str, str]) -> Claim:
        """`wanted`: program key -> build key of what `device` must build."""
        claim = Claim()
        with self._cond:
            if fingerprint_id in self._stopped:
                claim.mine = dict(wanted)
                return claim
            for key, build_key in wanted.items():
                done = self._done.get(build_key)
                if isinstance(done, Given):
                    claim.given[key] = done
                elif build_key in self._owner and done is None:
                    claim.waiting[key] = build_key
                elif (stored := self._from_store(build_key, key, claim)) is not None:
                    self._done[build_key] = claim.given[key] = stored
                else:  # unclaimed, or its builder failed: this device builds it
                    self._owner[build_key] = device
                    self._done.pop(build_key, None)
                    claim.mine[key] = build_key
        return claim

    def _from_store(self, build_key: str, key: str, claim: Claim) -> Given | None:
        if self.store is None:
            return None
        damaged = len(self.store.damaged)
        try:
            entry = self.store.get(build_key)
        except LocalStateError:
            return None
        if len(self.store.damaged) > damaged:
            claim.notes[key] = "its stored binary was damaged: deleted, never used"
        if entry is None or entry.key != key:
            return None
        return Given(key, entry.binary, entry.sha256, "from store", entry.built_by)

    def wait(self, claim: Claim, limit_s: float, gone: Callable[[], bool] = lambda: False) -> None:
        """Wait until every key of `claim.waiting` is published or failed, at most `limit_s` seconds, checking
        `gone` (the device's own connection closed: its deadline, Ctrl-C) every 0.2 s. Published ones move to
        `claim.given`, the rest to `claim.mine` with a note saying why."""
        end = time.monotonic() + limit_s
        with self._cond:
            while True:
                pending = {k: b for k, b in claim.waiting.items() if self._done.get(b) is None}
                left = end - time.monotonic()
                if not pending or left <= 0 or gone():
                    break
                self._cond.wait(min(left, 0.2))
            for key, build_key in claim.waiting.items():
                done = self._done.get(build_key)
                if isinstance(done, Given):
                    claim.given[key] = done
                    continue
                owner = self._owner.get(build_key, "?")
                claim.notes[key] = f"its builder {owner} failed" if done is _FAILED else \
                    f"its builder {owner} did not finish within {limit_s:g} s"
                claim.mine[key] = build_key
            claim.waiting = {}

    def publish(self, device: str, binaries: Mapping[str, tuple[str, bytes, str]]) -> None:
        """`binaries`: build key -> (program key, binary, sha256) that `device` compiled and pulled intact."""
        with self._cond:
            for build_key, (key, binary, sha) in binaries.items():
                if self._owner.get(build_key) == device:
                    self._done[build_key] = Given(key, binary, sha, f"shared from {device}", device)
            self._cond.notify_all()
        if self.store is not None:
            for build_key, (key, binary, _) in binaries.items():
                try:
                    self.store.put(build_key, key, binary, device)
                except LocalStateError:
                    pass  # only a store: the next push compiles it again

    def release(self, device: str) -> None:
        """`device` is done (passed or failed): whatever it claimed and did not publish has failed."""
        with self._cond:
            for build_key, owner in self._owner.items():
                if owner == device and self._done.get(build_key) is None:
                    self._done[build_key] = _FAILED
            self._cond.notify_all()

    def refuse(self, fingerprint_id: str, device: str, why: str) -> None:
        """A driver refused a shared binary: no more sharing for this fingerprint id in this push."""
        with self._cond:
            self._stopped.setdefault(fingerprint_id, f"{device}: {why}")


@dataclass(slots=True)
class DeviceShare:
    """One device's part in sharing, from its claim to its build reply: what it sends (`given`), and where
    each of its programs' binaries came from (`origin`, the push JSON's `origin` field, docs/json.md)."""

    share: BuildShare
    device: str
    fingerprint_id: str
    claim: Claim

    @classmethod
    def start(cls, share: BuildShare, device: str, fingerprint_id: str, wanted: Mapping[str, str], *,
              limit_s: float, gone: Callable[[], bool] = lambda: False) -> DeviceShare:
        """Claim what `device` must build (program key -> build key), then wait for what others build."""
        claim = share.claim(device, fingerprint_id, wanted)
        share.wait(claim, limit_s, gone)
        return cls(share, device, fingerprint_id, claim)

    def request(self) -> tuple[list[dict[str, object]], bytes]:
        """The build request's `given` list and its payload (the binaries, in that order)."""
        given = [self.claim.given[k] for k in sorted(self.claim.given)]
        return [g.to_request() for g in given], b"".join(g.binary for g in given)

    def origin(self, key: str, given_status: str | None) -> str:
        """Where the binary of `key` (a program this device built or received) came from, from the agent's
        `given` answer for it; a refusal stops sharing for this fingerprint."""
        received = self.claim.given.get(key)
        if received is None:
            why = self.claim.notes.get(key)
            return f"compiled ({why})" if why else "compiled"
        if given_status == "loaded":
            return received.origin
        why = (given_status or "no answer about the given binary").removeprefix("refused: ")
        self.share.refuse(self.fingerprint_id, self.device, f"refused the binary {received.origin}: {why}")
        return f"compiled (this driver refused the binary {received.origin}: {why}; sharing stopped for " \
               f"fingerprint {self.fingerprint_id})"

    def publish(self, binaries: Mapping[str, tuple[str, bytes, str]]) -> None:
        """What this device compiled itself and pulled intact (build key -> (program key, binary, sha256))."""
        self.share.publish(self.device, binaries)
