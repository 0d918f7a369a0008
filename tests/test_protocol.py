"""The protocol boundary: what a board sends is checked once, before anything keeps or shows it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from deployer.errors import AgentError
from deployer.protocol.fingerprint import fingerprint_id, parse_fingerprint
from deployer.protocol.reply import Reply
from deployer.tasks.plan import parse_state


def _fingerprint(**device: Any) -> dict[str, Any]:
    platform = {"name": "Portable Computing Language", "version": "OpenCL 3.0 PoCL 3.1"}
    dev = {"name": "cpu-haswell", "driver_version": "3.1", **device}
    return {"platform": platform, "device": dev, "cpu_only": True,
            "id": fingerprint_id(platform["name"], platform["version"], dev["name"], dev["driver_version"])}


def test_a_fingerprint_is_recomputed_not_believed() -> None:
    good = _fingerprint()
    assert parse_fingerprint(good)["id"] == good["id"]
    for bad_id in ("../../etc", "0123456789ABCDEF", good["id"][:15], good["id"] + "0", 12, None,
                   _fingerprint(name="another device")["id"]):
        with pytest.raises(AgentError) as caught:
            parse_fingerprint({**good, "id": bad_id})
        assert caught.value.kind == "bad_reply", bad_id


@pytest.mark.parametrize("broken, field", [
    ({"platform": "p"}, "platform"),
    ({"device": {"name": "d"}}, "driver_version"),
    ({"cpu_only": "yes"}, "cpu_only"),
])
def test_a_fingerprint_missing_what_later_steps_read_is_a_bad_reply(broken: dict[str, Any], field: str) -> None:
    with pytest.raises(AgentError, match=field):
        parse_fingerprint({**_fingerprint(), **broken})


def test_a_fingerprints_strings_are_kept_printable() -> None:
    """Escape sequences in a device name (clear screen, retitle the window) are never kept or shown raw."""
    parsed = parse_fingerprint(_fingerprint(name="\x1b[2J\x1b]0;owned\x07gpu"))
    assert "\x1b" not in parsed["device"]["name"] and "\x07" not in parsed["device"]["name"]
    assert parsed["device"]["name"].endswith("gpu")


@pytest.mark.parametrize("path", ["\x1b[2Jcleared.cl", "../outside", "/etc/passwd", "a/./b", "", "x" * 2000])
def test_a_state_naming_a_file_that_is_not_a_plain_path_is_a_bad_reply(path: str) -> None:
    """`push --check` prints the current release's files and a push sends them back in `drop`: a name with
    escape sequences (it cleared the screen) or a path out of the release is refused at the boundary."""
    state = {"current": "r1", "files": {path: {"size": 1, "sha256": "a" * 64}}, "manifest": {}}
    with pytest.raises(AgentError) as caught:
        parse_state(Reply({"ok": True}, json.dumps(state).encode()))
    assert caught.value.kind == "bad_reply" and "\x1b" not in caught.value.reason


def test_a_plain_state_is_read() -> None:
    state = {"current": "r1", "files": {"kernels/saxpy.cl": {"size": 1, "sha256": "a" * 64}}, "manifest": {}}
    assert parse_state(Reply({"ok": True}, json.dumps(state).encode())).files == {"kernels/saxpy.cl": (1, "a" * 64)}
