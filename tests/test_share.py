"""Build sharing's bookkeeping (deployer/tasks/share.py) and the local binary store (deployer/cache/binaries.py),
without devices: who compiles, who waits, and what a failed builder, a late one, a refused binary and a
damaged store entry lead to. The pushes that use them on real sim boards are in tests/test_push_share.py."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest

from deployer.cache.binaries import STORE, BinaryStore
from deployer.errors import LocalStateError
from deployer.tasks.share import BuildShare

FP = "0123456789abcdef"
BK1, BK2 = "1" * 32, "2" * 32
WANTED = {"saxpy -DA": BK1, "relu -DB": BK2}


def _binaries(tag: str) -> dict[str, tuple[str, bytes, str]]:
    out = {}
    for key, build_key in WANTED.items():
        binary = f"poclbin {tag} {key}".encode()
        out[build_key] = (key, binary, hashlib.sha256(binary).hexdigest())
    return out


def test_the_first_device_compiles_and_the_others_receive_its_binaries() -> None:
    share = BuildShare(None)
    first = share.claim("a", FP, WANTED)
    assert first.mine == WANTED and not first.waiting and not first.given
    second = share.claim("b", FP, WANTED)
    assert second.waiting == WANTED and not second.mine
    waiter = threading.Thread(target=lambda: share.wait(second, 30))
    waiter.start()
    share.publish("a", _binaries("a"))
    waiter.join(30)
    assert not waiter.is_alive() and second.notes == {}
    assert {k: g.origin for k, g in second.given.items()} == {k: "shared from a" for k in WANTED}
    assert second.given["saxpy -DA"].binary == b"poclbin a saxpy -DA" and not second.mine
    third = share.claim("c", FP, WANTED)  # after the publish: given at once
    assert set(third.given) == set(WANTED) and not third.waiting and not third.mine


def test_a_builder_that_fails_releases_its_claims_and_the_waiters_compile() -> None:
    share = BuildShare(None)
    share.claim("a", FP, WANTED)
    second = share.claim("b", FP, WANTED)
    waiter = threading.Thread(target=lambda: share.wait(second, 30))
    waiter.start()
    share.release("a")  # a's compile failed, or its connection was lost: it never publishes
    waiter.join(30)
    assert not waiter.is_alive()
    assert second.mine == WANTED and not second.given
    assert second.notes == {k: "its builder a failed" for k in WANTED}
    third = share.claim("c", FP, WANTED)  # a failed key is claimed again by the next device that needs it
    assert third.mine == WANTED


def test_nobody_waits_past_its_limit_or_its_own_end() -> None:
    share = BuildShare(None)
    share.claim("a", FP, WANTED)  # a hangs: never publishes, never releases
    second = share.claim("b", FP, WANTED)
    share.wait(second, 0.05)
    assert second.mine == WANTED and second.notes == {k: "its builder a did not finish within 0.05 s" for k in WANTED}
    third = share.claim("c", FP, WANTED)
    share.wait(third, 3600, gone=lambda: True)
    assert third.mine == WANTED and len(third.notes) == 2  # its own deadline closed it: no hour-long wait


def test_a_refused_binary_stops_sharing_for_that_fingerprint_only() -> None:
    share = BuildShare(None)
    share.claim("a", FP, WANTED)
    share.publish("a", _binaries("a"))
    share.refuse(FP, "b", "refused: CL_INVALID_BINARY")
    assert share.stopped(FP) == "b: refused: CL_INVALID_BINARY"
    assert share.claim("c", FP, WANTED).mine == WANTED  # each compiles for itself from now on
    other = "fedcba9876543210"
    assert share.claim("d", other, {"saxpy -DA": "3" * 32}).mine and share.stopped(other) is None


def test_the_store_serves_a_later_push_and_a_damaged_entry_is_rebuilt(tmp_path: Path) -> None:
    share = BuildShare(BinaryStore(tmp_path))
    share.claim("a", FP, WANTED)
    share.publish("a", _binaries("a"))
    later = BuildShare(BinaryStore(tmp_path))  # the next push
    claim = later.claim("new-board", FP, WANTED)
    assert {k: (g.origin, g.built_by) for k, g in claim.given.items()} == {k: ("from store", "a") for k in WANTED}
    # damage: a flipped byte in one binary, a record that is not JSON for the other
    data = tmp_path / STORE / f"{BK1}.bin"
    data.write_bytes(b"X" + data.read_bytes()[1:])
    (tmp_path / STORE / f"{BK2}.json").write_text("{not json")
    store = BinaryStore(tmp_path)
    claim = BuildShare(store).claim("new-board", FP, WANTED)
    assert claim.mine == WANTED and not claim.given  # never trusted: built again
    assert set(claim.notes.values()) == {"its stored binary was damaged: deleted, never used"}
    assert sorted(store.damaged) == [BK1, BK2]
    assert not list((tmp_path / STORE).iterdir())  # and deleted


def test_a_store_entry_filed_under_another_key_is_damaged(tmp_path: Path) -> None:
    store = BinaryStore(tmp_path)
    store.put(BK1, "saxpy -DA", b"poclbin one", "a")
    record = json.loads((tmp_path / STORE / f"{BK1}.json").read_text())
    (tmp_path / STORE / f"{BK2}.bin").write_bytes(b"poclbin one")
    (tmp_path / STORE / f"{BK2}.json").write_text(json.dumps(record))  # a copy: names BK1, filed as BK2
    assert store.get(BK2) is None and store.damaged == [BK2]
    assert store.get(BK1) is not None
    with pytest.raises(LocalStateError, match="is not a build key"):
        store.get("../../etc/passwd")


def test_a_device_share_names_each_origin_and_a_refusal_stops_sharing() -> None:
    from deployer.tasks.share import DeviceShare
    share = BuildShare(None)
    builder = DeviceShare.start(share, "a", FP, WANTED, limit_s=5)
    assert builder.request() == ([], b"") and builder.origin("saxpy -DA", None) == "compiled"
    builder.publish(_binaries("a"))
    taker = DeviceShare.start(share, "b", FP, WANTED, limit_s=5)
    given, payload = taker.request()
    assert [g["key"] for g in given] == sorted(WANTED) and [g["from"] for g in given] == ["a", "a"]
    assert payload == b"".join(_binaries("a")[WANTED[k]][1] for k in sorted(WANTED))
    assert taker.origin("saxpy -DA", "loaded") == "shared from a"
    refused = taker.origin("relu -DB", "refused: CL_INVALID_BINARY (-42) in clCreateProgramWithBinary")
    assert refused.startswith("compiled (this driver refused the binary shared from a: CL_INVALID_BINARY")
    assert share.stopped(FP) and DeviceShare.start(share, "c", FP, WANTED, limit_s=5).request() == ([], b"")


def test_two_workers_storing_one_key_at_once_leave_it_whole(tmp_path: Path) -> None:
    """Two boards whose builder failed both compile the key and store it: one temp name per process, so the
    store serialises its writers (unserialised, one writer's rename found the other's temp file gone)."""
    store = BinaryStore(tmp_path)
    errors: list[BaseException] = []

    def writer(tag: bytes) -> None:
        try:
            for _ in range(40):
                store.put(BK1, "saxpy -DA", b"poclbin " + tag * 4096, tag.decode())
        except BaseException as exc:  # noqa: BLE001 - any failure in the thread is the test's failure
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(tag,)) for tag in (b"a", b"b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    entry = store.get(BK1)
    assert entry is not None and entry.binary in (b"poclbin " + b"a" * 4096, b"poclbin " + b"b" * 4096)
    assert store.damaged == []
