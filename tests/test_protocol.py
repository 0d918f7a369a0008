"""The protocol boundary: what a board sends is checked once, before anything keeps or shows it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployer.errors import AgentError, CompileError
from deployer.protocol.fingerprint import fingerprint_id, parse_fingerprint
from deployer.protocol.ops import Found, Refused, check_found, parse_build
from deployer.protocol.reply import Fields, Reply
from deployer.tasks.plan import parse_state
from deployer.text import one_line, visible


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


# ----- typed replies (deployer/protocol/ops.py): what each op's reply may hold -----

SHA = "ab" * 32


def _build(**reply: Any) -> dict[str, Any]:
    program = {"key": "relu -DT=float", "ok": True, "sha256": SHA, "log": "ok"}
    return {"programs": [program], "cache_sha256": SHA, "manifest_file": "build/manifest.json", **reply}


def test_a_plain_build_reply_is_typed() -> None:
    built = parse_build(Reply(_build(), b""), ["relu -DT=float"])
    assert built.binaries == {"relu -DT=float": SHA} and built.manifest_file == "build/manifest.json"
    built.raise_for_failed()


@pytest.mark.parametrize("reply, field", [
    (_build(cache_sha256="AB" * 32), "cache_sha256"),
    (_build(manifest_file="../../.ssh/authorized_keys"), "manifest_file"),
    (_build(manifest_file="/etc/passwd"), "manifest_file"),
    (_build(programs=[{"key": "relu -DT=float", "ok": True, "sha256": "zz"}]), "sha256"),
    (_build(programs=[{"key": "relu -DT=float", "ok": "yes"}]), "ok"),
    (_build(programs=[{"key": "not asked for", "ok": True, "sha256": SHA}]), "not asked for"),
    (_build(programs=[{"key": "relu -DT=float", "ok": True, "sha256": SHA}] * 2), "programs"),
    (_build(programs="all of them"), "programs"),
])
def test_a_build_reply_outside_its_contract_is_a_bad_reply(reply: dict[str, Any], field: str) -> None:
    with pytest.raises(AgentError, match=field) as caught:
        parse_build(Reply(reply, b""), ["relu -DT=float"])
    assert caught.value.kind == "bad_reply"


def test_a_failed_programs_log_is_printable_and_bounded() -> None:
    log = "\x1b]0;owned\x07" + "x" * (1 << 20)
    built = parse_build(Reply(_build(programs=[{"key": "relu -DT=float", "ok": False, "log": log}]), b""),
                        ["relu -DT=float"])
    assert "\x1b" not in built.programs[0].log and len(built.programs[0].log) <= 1 << 16
    with pytest.raises(CompileError, match="1 program"):
        built.raise_for_failed()


@pytest.mark.parametrize(("value", "ok"), [(0, True), (12.5, True), (None, True), (-1, False), (1e9, False),
                                           (float("nan"), False), (True, False), ("3", False)])
def test_a_duration_is_ms_or_a_bad_reply_naming_record_and_field(value: Any, ok: bool) -> None:
    fields = Fields({"steady_ms": value, "wall_ms": [value]}, "startup reply model 'm'")
    if not ok:
        for read in (lambda: fields.optional_ms("steady_ms"), lambda: fields.ms_list("wall_ms", 1)):
            with pytest.raises(AgentError, match="startup reply model 'm' field '(steady|wall)_ms'") as caught:
                read()
            assert caught.value.kind == "bad_reply"
    elif value is None:
        assert fields.optional_ms("steady_ms") is None
    else:
        assert fields.optional_ms("steady_ms") == fields.ms_list("wall_ms", 1)[0] == float(value)


def test_a_nested_record_is_named_with_its_parent() -> None:
    with pytest.raises(AgentError, match="fingerprint platform field 'name': expected a string"):
        Fields({"platform": {"name": 3}}, "fingerprint").nested("platform").text("name")
    with pytest.raises(AgentError, match="bench reply case field 'wall_ms': expected a list of at most 2"):
        Fields({"wall_ms": [1, 2, 3]}, "bench reply case").ms_list("wall_ms", 2)


values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                      lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                   max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["programs", "cache_sha256", "manifest_file", "key", "ok", "sha256",
                                        "log"]), values, max_size=5))
def test_any_build_reply_is_typed_or_a_bad_reply(reply: dict[str, Any]) -> None:
    try:
        parse_build(Reply(reply, b""), ["relu -DT=float"])
    except AgentError as exc:
        assert exc.kind == "bad_reply"


@settings(max_examples=300, deadline=None)
@given(values)
def test_any_find_entry_is_found_or_refused_with_a_printable_path(entry: Any) -> None:
    checked = check_found(entry, 1 << 20)
    assert isinstance(checked, Found | Refused)
    if isinstance(checked, Refused):
        assert checked.path.isprintable() and checked.why.isprintable()


@pytest.mark.parametrize("text", ["\x1b[2J\x1b]0;owned\x07", "a\rb", "\x9b31m", "bell\x07", "nul\x00"])
def test_board_text_is_kept_and_shown_with_its_control_characters_visible(text: str) -> None:
    """One implementation (deployer.text) for the boundary, the renderer and the HTML report."""
    from deployer.cli.render import shown
    from deployer.reports.html import visible as html_visible

    for made in (visible(text, 100), one_line(text, 100), shown(text), html_visible(text)):
        assert made.isprintable() and "\\" in made, made
    assert one_line("two\nlines", 100) == "two\\nlines" and visible("two\nlines", 100) == "two\nlines"
    assert len(visible("\x1b" * 1000, 50)) <= 50 and len(one_line("x" * 1000, 50)) == 50
