"""`junit.xml`: a run report (docs/report.md) as JUnit XML in the xunit2 style pytest writes, for CI.

The mapping (docs/report.md, "junit.xml"):
- `<testsuites>` holds one `<testsuite>` per device (named by it; `hostname` the device, `timestamp` its start
  in UTC, `time` its run in seconds), whose `<properties>` say the run, the playbook and the fleet.
- One `<testcase>` per result (device x step x item): `name` is `STEP` for a step as a whole, else
  `STEP: ITEM`, unique within its suite; `classname` is `PLAYBOOK.DEVICE` with each dot inside either name
  written as U+2024 (ONE DOT LEADER, which looks like a dot): Jenkins splits a classname at its dots into
  packages and GitLab takes the classname as the suite, so each shows exactly one suite per device, however
  the device is named, and no two device names share a classname.
- `outcome` maps a result to the testcase's child: `fail` -> `<failure>`, `error` -> `<error>`, `miss` (not
  run: device offline, run stopped, board locked) and `skip` -> `<skipped>` with the reason. Nothing is left
  out: a device offline shows every step it missed as skipped, a device with no result a skipped testcase
  saying so (Ansible's junit callback leaves unreachable hosts out, and CI shows them green: ansible#63962).

The document is valid against both the Jenkins xUnit plugin's `junit-10.xsd` and the stricter Ant schema
(windyroad `JUnit.xsd`); tests/data/junit/README.md says where each comes from.
"""

from __future__ import annotations

import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

DOT = "\u2024"  # ONE DOT LEADER: a dot inside a name, which Jenkins does not split a classname at
MESSAGE_MAX = 500  # characters of a reason in a `message` attribute (the element's text has all of it)

# Characters XML 1.0 cannot hold at all, even escaped; shown as \xNN or \uNNNN instead.
_NOT_XML = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

Report = Mapping[str, Any]  # the run report (deployer.history.report.run_report), as written to report.json


@dataclass(frozen=True, slots=True)
class Outcome:
    """The child of a testcase that did not pass: `<failure>`, `<error>` or `<skipped>`."""

    element: Literal["failure", "error", "skipped"]
    type: str  # what the result was: fail, error, miss, skip (written for failure and error: the Ant schema
    #            gives <skipped> a message only; a miss says "not run: ..." there)
    message: str  # one line: why
    text: str = ""  # the details, as the element's text


def outcome(result: Mapping[str, Any], device: Mapping[str, Any]) -> Outcome | None:
    """How one result of the report shows in CI; None for a pass. This is the one place a kind of result is
    mapped: a latency `regression` verdict becomes a `<failure>` with its figures, before the status checks."""
    status, reason = result["status"], result["reason"]
    latency = result.get("latency")
    if status == "pass" and isinstance(latency, Mapping) and latency.get("kind") == "regression":
        return Outcome("failure", "regression", f"latency regression: {latency.get('note') or ''}".strip(),
                       _regression_details(latency))
    if status == "fail":
        return Outcome("failure", "fail", reason or "failed", _details(result))
    if status == "error":
        return Outcome("error", "error", reason or "error", _details(result))
    if status == "miss":
        return Outcome("skipped", "miss", f"not run: {reason or device['reason'] or 'no reason recorded'}")
    if status == "skip":
        return Outcome("skipped", "skip", reason or "not applicable")
    return None


def _details(result: Mapping[str, Any]) -> str:
    lines = [result["reason"]] if result["reason"] else []
    verdict = result["verdict"]
    if verdict is not None:
        against = f" (against run {verdict['baseline_run']})" if verdict["baseline_run"] is not None else ""
        lines.append(f"verdict: {verdict['label']}{against}" + (f": {verdict['note']}" if verdict["note"] else ""))
    if result["attempts"] > 1:
        lines.append(f"attempts: {result['attempts']}")
    lines += [f"{m['name']}: {m['value']:g}{' ' + m['unit'] if m['unit'] else ''}" for m in result["metrics"]]
    return "\n".join(lines)


def junit_xml(report: Report, *, planned: Sequence[str] = ()) -> bytes:
    """The report as a JUnit XML document (UTF-8). `planned`: the run's devices as planned; one the report
    does not hold (a run killed before its result was stored) still gets a suite, its testcase skipped."""
    root = ET.Element("testsuites")
    devices = list(report["devices"])
    recorded = {d["name"] for d in devices}
    devices += [_unrecorded(name, report) for name in planned if name not in recorded]
    for index, device in enumerate(devices):
        root.append(_suite(report, device, index))
    ET.indent(root)
    document: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return document + b"\n"


def _unrecorded(name: str, report: Report) -> dict[str, Any]:
    """A device the run planned and never recorded, in the report's shape."""
    started = report["run"]["started"]
    why = "no result was recorded for this device (the run ended before it finished)"
    return {"name": name, "state": "incomplete", "status": "miss", "reason": why, "started": started,
            "ended": started, "fingerprint": None, "results": []}


def _suite(report: Report, device: Mapping[str, Any], index: int) -> ET.Element:
    run = report["run"]
    cases = [_case(report, device, result) for result in device["results"]] or [_no_results(report, device)]
    _unique_names(cases)
    children = [case.find("*") for case in cases]
    suite = ET.Element("testsuite", {
        "name": _xml(device["name"]), "tests": str(len(cases)),
        "failures": str(sum(1 for c in children if c is not None and c.tag == "failure")),
        "errors": str(sum(1 for c in children if c is not None and c.tag == "error")),
        "skipped": str(sum(1 for c in children if c is not None and c.tag == "skipped")),
        "time": _seconds(device["ended"] - device["started"]),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(device["started"])),
        "hostname": _xml(device["name"]), "package": _xml(run["playbook"]["name"]), "id": str(index),
    })
    properties = ET.SubElement(suite, "properties")
    for name, value in _properties(run, device):
        ET.SubElement(properties, "property", {"name": name, "value": _xml(value)})
    suite.extend(cases)
    ET.SubElement(suite, "system-out").text = _xml(_summary(device))
    ET.SubElement(suite, "system-err")
    return suite


def _properties(run: Mapping[str, Any], device: Mapping[str, Any]) -> list[tuple[str, str]]:
    fingerprint = device["fingerprint"]
    return [
        ("run.id", str(run["id"])), ("run.status", run["status"]), ("run.history", run["history"]),
        ("playbook.name", run["playbook"]["name"]), ("playbook.file", run["playbook"]["file"]),
        ("playbook.sha256", run["playbook"]["sha256"]), ("fleet", run["fleet"]),
        ("device.state", device["state"]), ("device.status", device["status"]),
        ("device.reason", device["reason"]),
        ("device.fingerprint", "" if fingerprint is None else f"{fingerprint['id']} {fingerprint['label']}"),
    ]


def _summary(device: Mapping[str, Any]) -> str:
    line = f"{device['name']}: {device['state']}, {device['status']}"
    return line + (f": {device['reason']}" if device["reason"] else "")


def _case(report: Report, device: Mapping[str, Any], result: Mapping[str, Any]) -> ET.Element:
    name = result["step"] + (f": {result['item']}" if result["item"] else "")
    case = ET.Element("testcase", {"name": _xml(name), "classname": classname(report, device["name"]),
                                   "time": _seconds(result["duration_s"] or 0.0)})
    found = outcome(result, device)
    if found is not None:
        attributes = {"message": _xml(_one_line(found.message))}
        if found.element != "skipped":
            attributes["type"] = found.type
        child = ET.SubElement(case, found.element, attributes)
        child.text = _xml(found.text) or None
    return case


def _no_results(report: Report, device: Mapping[str, Any]) -> ET.Element:
    """The one testcase of a device with no result at all, so that it is never left out."""
    case = ET.Element("testcase", {"name": "device", "classname": classname(report, device["name"]), "time": "0.000"})
    why = f"not run: {device['reason'] or 'no result was recorded for this device'}"
    ET.SubElement(case, "skipped", {"message": _xml(_one_line(why))})
    return case


def classname(report: Report, device: str) -> str:
    """`PLAYBOOK.DEVICE`, each dot inside a name written as U+2024 (module docstring)."""
    return _xml(f"{report['run']['playbook']['name'].replace('.', DOT)}.{device.replace('.', DOT)}")


def _unique_names(cases: list[ET.Element]) -> None:
    """A second testcase of the same name (a history could hold two results of one step and item) gets ` #2`."""
    used: set[str] = set()
    for case in cases:
        name = wanted = case.get("name", "")
        number = 1
        while name in used:
            number += 1
            name = f"{wanted} #{number}"
        used.add(name)
        case.set("name", name)


def _seconds(value: float) -> str:
    return f"{max(0.0, value):.3f}"


def _one_line(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= MESSAGE_MAX else first[:MESSAGE_MAX - 3] + "..."


def _xml(text: str) -> str:
    """Text XML can hold: a character it cannot (a control character a board sent) is shown escaped."""
    return _NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}",
                        text)


def _regression_details(latency: Mapping[str, Any]) -> str:
    """A regression's figures: the metric, the levels before and now, the change, since which run, p."""
    parts = [f"metric {latency.get('metric')}"]
    for key, label in (("baseline", "before"), ("current", "now")):
        if isinstance(latency.get(key), int | float):
            parts.append(f"{label} {latency[key]:.6g} ms")
    if isinstance(latency.get("change"), int | float):
        parts.append(f"change {latency['change']:+.1%}")
    if latency.get("since_run") is not None:
        parts.append(f"since run {latency['since_run']}")
    if isinstance(latency.get("p_value"), int | float):
        parts.append(f"p {latency['p_value']:.2g}")
    return "; ".join(parts)
