"""The playbook loader (`deployer.config.playbooks`): records, defaults, `describe`, and every bad input.

Error cases are a table (YAML in; file:line, field and problem out), as in test_inventory.py; each playbook is a
file in a folder of the test's own that holds a `kernels/` library and a model, so paths resolve as they would.
Hypothesis checks that any text either loads or raises `PlaybookError` with a file:line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployer.config.playbooks import (
    CollectStep,
    HealthStep,
    Limit,
    MetricsSpec,
    Playbook,
    PushStep,
    ShellStep,
    SmokeStep,
    Step,
    describe,
    load_playbook,
    parse_playbook,
)
from deployer.errors import InputError, InventoryError, PlaybookError, Where

REPO = Path(__file__).resolve().parents[1]
HEAD = "name: n\nsteps:\n"  # lines 1-2: a step written after it starts on line 3


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a kernel library, a model and a plain file, where the playbooks of this module are written."""
    folder = tmp_path_factory.mktemp("lab")
    (folder / "kernels").mkdir()
    (folder / "kernels" / "kernels.yml").write_text("programs: []\n")
    (folder / "bare").mkdir()  # a folder without kernels.yml
    (folder / "models").mkdir()
    (folder / "models" / "m.npz").write_bytes(b"PK")
    (folder / "notes.txt").write_text("not a folder\n")
    return folder


def load(root: Path, text: str, name: str = "pb.yml") -> Playbook:
    path = root / name
    path.write_text(textwrap.dedent(text))
    return load_playbook(path)


def only_step(root: Path, text: str) -> Step:
    steps = load(root, HEAD + textwrap.dedent(text)).steps
    assert len(steps) == 1
    return steps[0]


# --- errors: (id, yaml, line, field, words in the problem) -----------------------------------------------

PUSH = "  - push:\n      kernels: kernels\n"  # lines 3-4
SHELL = "  - shell:\n      command: cat /proc/loadavg\n      metrics:\n"  # lines 3-5; metrics fields from line 6
LIMIT = "  - health:\n      limits:\n        - name: temp\n          command: cat t\n"  # lines 3-6

ERRORS: list[tuple[str, str, int, str | None, str]] = [
    ("empty file", "", 1, None, "empty playbook: expected a mapping with 'name' and 'steps'"),
    ("top level is a list", "- health:\n", 1, None, "the top level must be a mapping with 'name' and 'steps'"),
    ("yaml syntax", HEAD + "  - health: [x\n", 4, None, "invalid YAML"),
    ("duplicate key", HEAD + "  - health:\n    timeout: 5\n    timeout: 6\n", 5, "steps[0].timeout",
     "duplicate key (first at line 4)"),
    ("unknown top field", "nmae: n\nsteps:\n  - health:\n", 1, "nmae", "unknown field; did you mean 'name'?"),
    ("unknown top field, no match", HEAD + "  - health:\nzzz: 1\n", 4, "zzz",
     "unknown field (valid: name, limit, defaults, steps)"),
    ("no name", "steps:\n  - health:\n", 1, "name", "missing: name the playbook (a word)"),
    ("no steps key", "name: n\n", 1, "steps", "missing: list the steps"),
    ("empty steps", "name: n\nsteps: []\n", 2, "steps", "no steps: list at least one"),
    ("steps is null", "name: n\nsteps:\n", 2, "steps", "expected a list of steps (got nothing)"),
    ("steps is a word", "name: n\nsteps: health\n", 2, "steps", "expected a list of steps (got 'health')"),
    ("name with a space", "name: night ly\nsteps:\n  - health:\n", 1, "name",
     "invalid playbook name 'night ly': up to 255 letters"),
    ("name is a list", "name: [a]\nsteps:\n  - health:\n", 1, "name", "expected a name (got a list)"),
    ("limit is a list", HEAD + "  - health:\nlimit: [a]\n", 4, "limit", "expected a single value (got a list)"),
    ("unknown step kind", HEAD + "  - helth:\n", 3, "steps[0].helth", "unknown field; did you mean 'health'?"),
    ("unknown step key", HEAD + "  - health:\n    timout: 5\n", 4, "steps[0].timout",
     "unknown field; did you mean 'timeout'?"),
    ("step without a kind", HEAD + "  - health:\n  - timeout: 5\n", 4, "steps[1]",
     "no step kind: give exactly one of health, push, smoke, bench, collect, shell"),
    ("empty step", HEAD + "  -\n", 3, "steps[0]", "no step kind"),
    ("two kinds in one step", HEAD + "  - health:\n    smoke: {kernels: kernels}\n", 4, "steps[0].smoke",
     "a second step kind in one step (after 'health'): split it into two steps"),
    ("a step written as a word", HEAD + "  - health\n", 3, "steps[0]",
     "expected a mapping (got 'health'): write `health:`, with a colon"),
    ("a step that is a list", HEAD + "  - [health]\n", 3, "steps[0]", "expected a mapping (got a list)"),
    ("two unnamed steps of a kind", HEAD + "  - health:\n  - health:\n", 4, "steps[1].name",
     "duplicate step name 'health' (first at line 3): give the second health step a `name`"),
    ("duplicate step names", HEAD + "  - {name: a, health: }\n  - name: a\n    collect:\n", 4, "steps[1].name",
     "duplicate step name 'a' (first at line 3): step names are unique"),
    ("a name taken by an unnamed step", HEAD + "  - collect:\n  - name: collect\n    health:\n", 4,
     "steps[1].name", "duplicate step name 'collect' (first at line 3)"),
    ("bad step name", HEAD + "  - name: my step\n    health:\n", 3, "steps[0].name", "invalid step name 'my step'"),
    ("timeout zero", HEAD + "  - health:\n    timeout: 0\n", 4, "steps[0].timeout",
     "expected a number of seconds > 0 (got 0)"),
    ("timeout text", HEAD + "  - health:\n    timeout: soon\n", 4, "steps[0].timeout", "(got 'soon')"),
    ("timeout past a float", HEAD + "  - health:\n    timeout: 1" + "0" * 400 + "\n", 4, "steps[0].timeout",
     "expected a number of seconds > 0"),
    ("retries six", HEAD + "  - health:\n    retries: 6\n", 4, "steps[0].retries", "expected an integer 0-5 (got 6)"),
    ("retries true", HEAD + "  - health:\n    retries: true\n", 4, "steps[0].retries", "(got true)"),
    ("continue_on_error text", HEAD + "  - health:\n    continue_on_error: maybe\n", 4,
     "steps[0].continue_on_error", "expected true or false (got 'maybe')"),
    ("unknown defaults field", "defaults: {timout: 5}\n" + HEAD + "  - health:\n", 1, "defaults.timout",
     "did you mean 'timeout'?"),
    ("defaults retries", "defaults:\n  retries: 9\n" + HEAD + "  - health:\n", 2, "defaults.retries",
     "expected an integer 0-5 (got 9)"),
    # health and its limits
    ("health is a list", HEAD + "  - health: [a]\n", 3, "steps[0].health", "expected a mapping (got a list)"),
    ("unknown health field", HEAD + "  - health:\n      min_free: 5\n", 4, "steps[0].health.min_free",
     "did you mean 'min_free_mb'?"),
    ("min_free_mb negative", HEAD + "  - health:\n      min_free_mb: -1\n", 4, "steps[0].health.min_free_mb",
     "expected an integer >= 0 (got -1)"),
    ("min_free_mb a float", HEAD + "  - health:\n      min_free_mb: 6.5\n", 4, "steps[0].health.min_free_mb",
     "(got 6.5)"),
    ("limits not a list", HEAD + "  - health:\n      limits: {name: t}\n", 4, "steps[0].health.limits",
     "expected a list of limits (got a mapping)"),
    ("limit without min and max", HEAD + LIMIT, 5, "steps[0].health.limits[0]",
     "neither min nor max: give one or both"),
    ("limit min above max", HEAD + LIMIT + "          max: 85\n          min: 90\n", 8,
     "steps[0].health.limits[0].min", "min 90 is above max 85"),
    ("limit max text", HEAD + LIMIT + "          max: hot\n", 7, "steps[0].health.limits[0].max",
     "expected a number (got 'hot')"),
    ("limit max infinite", HEAD + LIMIT + "          max: .inf\n", 7, "steps[0].health.limits[0].max",
     "expected a number (got .inf)"),
    ("limit min boolean", HEAD + LIMIT + "          min: false\n", 7, "steps[0].health.limits[0].min",
     "expected a number (got false)"),
    ("limit scale zero", HEAD + LIMIT + "          scale: 0\n          max: 1\n", 7,
     "steps[0].health.limits[0].scale", "expected a number other than 0"),
    ("limit unit a number", HEAD + LIMIT + "          unit: 5\n          max: 1\n", 7,
     "steps[0].health.limits[0].unit", "expected text on one line, '' for none (got 5): quote it"),
    ("unknown limit field", HEAD + LIMIT + "          maximum: 85\n", 7, "steps[0].health.limits[0].maximum",
     "unknown field; did you mean 'max'?"),
    ("limit without command", HEAD + "  - health:\n      limits:\n        - {name: t, max: 1}\n", 5,
     "steps[0].health.limits[0].command", "missing: each limit needs a name and a command"),
    ("limit named like a health item",
     HEAD + "  - health:\n      limits:\n        - {name: disk, command: df, max: 1}\n", 5,
     "steps[0].health.limits[0].name", "'disk' names another item (a health check of its own): rename it"),
    ("duplicate limit names", HEAD + LIMIT + "          max: 1\n        - {name: temp, command: x, max: 2}\n", 8,
     "steps[0].health.limits[1].name", "'temp' names another item (first at line 5)"),
    ("limit name with a space", HEAD + "  - health:\n      limits:\n        - {name: a b, command: x, max: 1}\n", 5,
     "steps[0].health.limits[0].name", "invalid limit name 'a b'"),
    ("limit command empty", HEAD + "  - health:\n      limits:\n        - {name: t, command: '', max: 1}\n", 5,
     "steps[0].health.limits[0].command", "expected a shell command: non-empty text (got '')"),
    # push and smoke
    ("push without kernels", HEAD + "  - push:\n      models: []\n", 4, "steps[0].push.kernels",
     "missing: the kernel library folder (with kernels.yml)"),
    ("push is empty", HEAD + "  - push:\n", 3, "steps[0].push.kernels", "missing"),
    ("unknown push field", HEAD + PUSH + "      kernel: x\n", 5, "steps[0].push.kernel",
     "unknown field; did you mean 'kernels'?"),
    ("smoke mode misspelt", HEAD + PUSH + "      smoke: chnged\n", 5, "steps[0].push.smoke",
     "expected one of changed, always, never (got 'chnged'); did you mean 'changed'?"),
    ("mace_format misspelt", HEAD + PUSH + "      mace_format: pbb\n", 5, "steps[0].push.mace_format",
     "expected one of pb, legacy (got 'pbb'); did you mean 'pb'?"),
    ("keep zero", HEAD + PUSH + "      keep: 0\n", 5, "steps[0].push.keep", "expected an integer >= 1 (got 0)"),
    ("mace_version a list", HEAD + PUSH + "      mace_version: [1]\n", 5, "steps[0].push.mace_version",
     "expected a single value (got a list)"),
    ("kernels folder missing", HEAD + "  - push:\n      kernels: ../nowhere\n", 4, "steps[0].push.kernels",
     "no such folder (a relative path starts at the playbook's folder)"),
    ("kernels is a file", HEAD + "  - smoke:\n      kernels: notes.txt\n", 4, "steps[0].smoke.kernels",
     "notes.txt: not a folder"),
    ("kernels without kernels.yml", HEAD + "  - smoke:\n      kernels: bare\n", 4, "steps[0].smoke.kernels",
     "bare: no kernels.yml in it: not a kernel library"),
    ("kernels a number", HEAD + "  - smoke:\n      kernels: 5\n", 4, "steps[0].smoke.kernels",
     "expected non-empty text on one line (got 5)"),
    ("model missing", HEAD + PUSH + "      models:\n        - models/m.npz\n        - models/gone.npz\n", 7,
     "steps[0].push.models", "gone.npz: no such file"),
    ("model is a folder", HEAD + "  - smoke:\n      kernels: kernels\n      models: [models]\n", 5,
     "steps[0].smoke.models", "models: not a regular file"),
    ("models not a list", HEAD + PUSH + "      models: models/m.npz\n", 5, "steps[0].push.models",
     "expected a list of model files (got 'models/m.npz')"),
    # collect
    ("collect path relative", HEAD + "  - collect:\n      paths: ['model/*.bin']\n", 4, "steps[0].collect.paths",
     "'model/*.bin' is relative: give an absolute glob, or one under ~/"),
    ("collect paths empty", HEAD + "  - collect:\n      paths: []\n", 4, "steps[0].collect.paths",
     "an empty list: leave `paths` out for deploy collect's default places"),
    ("collect path a number", HEAD + "  - collect:\n      paths: [5]\n", 4, "steps[0].collect.paths",
     "expected non-empty text on one line (got 5)"),
    ("unknown collect field", HEAD + "  - collect:\n      path: [/x]\n", 4, "steps[0].collect.path",
     "did you mean 'paths'?"),
    # shell and its metrics
    ("shell without command", HEAD + "  - shell:\n      expect_exit: 0\n", 4, "steps[0].shell.command",
     "missing: the shell command to run on the board"),
    ("shell command a number", HEAD + "  - shell:\n      command: 5\n", 4, "steps[0].shell.command",
     "expected a shell command: non-empty text (got 5)"),
    ("shell command with a control character", HEAD + '  - shell:\n      command: "ls\\x1b"\n', 4,
     "steps[0].shell.command", "expected a shell command"),
    ("expect_exit 256", HEAD + "  - shell:\n      command: x\n      expect_exit: 256\n", 5,
     "steps[0].shell.expect_exit", "expected an integer 0-255 (got 256)"),
    ("regex does not compile", HEAD + SHELL + "        regex: '(?P<a>[0-9'\n", 6, "steps[0].shell.metrics.regex",
     "not a valid regex: unterminated character set"),
    ("regex too deep", HEAD + SHELL + "        regex: '" + "(" * 3000 + "a" + ")" * 3000 + "'\n", 6,
     "steps[0].shell.metrics.regex", "not a valid regex"),
    ("regex without a named group", HEAD + SHELL + "        regex: '([0-9.]+)'\n", 6,
     "steps[0].shell.metrics.regex", "no named group: name each value, as in (?P<load1>[0-9.]+)"),
    ("units name a group the regex lacks", HEAD + SHELL + "        regex: '(?P<load1>[0-9.]+)'\n"
     "        units:\n          lod1: ''\n", 8, "steps[0].shell.metrics.units", "'lod1' is no group of the regex; "
     "did you mean 'load1'?"),
    ("unit a number", HEAD + SHELL + "        regex: '(?P<a>.)'\n        units: {a: 5}\n", 7,
     "steps[0].shell.metrics.units.a", "expected text (got 5): quote it"),
    ("metrics with neither", HEAD + SHELL + "        units: {a: s}\n", 6, "steps[0].shell.metrics",
     "neither regex nor json: true: give a regex with named groups, or json: true"),
    ("metrics json false", HEAD + SHELL + "        json: false\n", 6, "steps[0].shell.metrics",
     "neither regex nor json: true"),
    ("metrics with both", HEAD + SHELL + "        regex: '(?P<a>.)'\n        json: true\n", 6,
     "steps[0].shell.metrics", "both regex and json: true"),
    ("unknown metrics field", HEAD + SHELL + "        regexp: '(?P<a>.)'\n", 6, "steps[0].shell.metrics.regexp",
     "unknown field; did you mean 'regex'?"),
]


@pytest.mark.parametrize(("text", "line", "field", "words"), [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_error(root: Path, text: str, line: int, field: str | None, words: str) -> None:
    with pytest.raises(PlaybookError) as caught:
        load(root, text)
    error, file = caught.value, str(root / "pb.yml")
    assert (error.where, error.field) == (Where(file, line), field), str(error)
    assert words in error.problem, str(error)
    assert str(error).startswith(f"{file}:{line}: " + (f"field {field!r}: " if field else "")), str(error)


def test_message_shape(root: Path) -> None:
    with pytest.raises(PlaybookError) as caught:
        load(root, HEAD + "  - name: build\n    push:\n      kernels: kernels\n      smok: always\n")
    assert str(caught.value) == (
        f"{root / 'pb.yml'}:6: field 'steps[0].push.smok': unknown field; did you mean 'smoke'?"
    )


def test_errors_are_playbook_errors_with_exit_code_2(root: Path) -> None:
    """The shared YAML and field parsers raise the inventory's class; a playbook's error must not read as one."""
    with pytest.raises(InputError) as caught:
        load(root, "name: n\nsteps: [\n")  # from the YAML reader
    assert type(caught.value) is PlaybookError and not isinstance(caught.value, InventoryError)
    assert caught.value.exit_code == 2 and caught.value.device is None


def test_missing_kernels_names_the_resolved_folder(root: Path) -> None:
    with pytest.raises(PlaybookError) as caught:
        load(root, HEAD + "  - smoke:\n      kernels: ../nowhere\n")
    assert f"{root.parent / 'nowhere'}: no such folder" in caught.value.problem


def test_invalid_utf8_names_its_line(root: Path) -> None:
    path = root / "latin1.yml"
    path.write_bytes(HEAD.encode() + b"  - shell:\n      command: caf\xe9\n")
    with pytest.raises(PlaybookError) as caught:
        load_playbook(path)
    assert caught.value.where == Where(str(path), 4) and "not UTF-8" in caught.value.problem


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PlaybookError) as caught:
        load_playbook(tmp_path / "nope.yml")
    assert str(caught.value) == f"{tmp_path / 'nope.yml'}: no such file"


@pytest.mark.parametrize("special", ["folder", "/dev/zero", "fifo"])
def test_only_regular_files_are_read(tmp_path: Path, special: str) -> None:
    path = {"folder": tmp_path, "/dev/zero": Path("/dev/zero"), "fifo": tmp_path / "fifo"}[special]
    if special == "fifo":
        os.mkfifo(path)
    with pytest.raises(PlaybookError, match=r"the playbook: not a regular file") as caught:
        load_playbook(path)
    assert caught.value.where == Where(str(path))


def test_size_cap(tmp_path: Path) -> None:
    big = tmp_path / "big.yml"
    with open(big, "wb") as out:
        out.truncate((1 << 20) + 1)  # sparse: over the 1 MiB cap without writing it
    with pytest.raises(PlaybookError, match=r"1048577 bytes, over the limit of 1048576"):
        load_playbook(big)


# --- what loads ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nightly", "smoke"])
def test_shipped_playbooks_load(name: str) -> None:
    path = REPO / "playbooks" / f"{name}.yml"
    playbook = load_playbook(path)
    assert (playbook.name, playbook.file) == (name, path)
    assert playbook.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    health = playbook.steps[0].options
    assert isinstance(health, HealthStep)
    assert health.limits == (Limit("temperature", "cat /sys/class/thermal/thermal_zone0/temp", 0.001, "C", None, 85.0),)
    for step in playbook.steps:
        if isinstance(step.options, (PushStep, SmokeStep)):
            assert step.options.kernels == REPO / "kernels"
            assert step.options.models == (REPO / "models" / "tiny_cnn.npz",)


def test_nightly_playbook() -> None:
    playbook = load_playbook(REPO / "playbooks" / "nightly.yml")
    assert playbook.limit == "all"
    assert [(s.name, s.kind) for s in playbook.steps] == [
        ("health", "health"), ("build", "push"), ("smoke", "smoke"), ("bench", "bench"), ("collect", "collect"),
        ("load", "shell"),
    ]
    push, shell = playbook.steps[1].options, playbook.steps[5]
    assert isinstance(push, PushStep) and push.smoke == "always"
    assert isinstance(shell.options, ShellStep) and shell.options.command == "cat /proc/loadavg"
    assert shell.options.metrics is not None and dict(shell.options.metrics.units) == {
        "load1": "", "load5": "", "load15": ""}
    assert shell.continue_on_error and shell.timeout == 30.0
    assert [describe(s) for s in playbook.steps] == [
        "health reachable, opencl, disk >= 64 MB free, temperature <= 85 C (timeout 60 s, retries 1)",
        "push kernels/ + 1 model, smoke always (timeout 900 s, retries 1)",
        "smoke kernels/ + 1 model (timeout 600 s, retries 1)",
        "bench kernels/ + 1 model, 10-200 repeats over >= 200 ms after 3 warm-up, report steps >= 5% "
        "(timeout 1800 s, retries 1, continue on error)",
        "collect the default places (timeout 300 s, retries 1)",
        "shell `cat /proc/loadavg`, metrics load1, load5, load15 (timeout 30 s, retries 1, continue on error)",
    ]


def test_smoke_playbook_is_health_and_smoke() -> None:
    playbook = load_playbook(REPO / "playbooks" / "smoke.yml")
    assert [s.kind for s in playbook.steps] == ["health", "smoke"] and playbook.limit is None


FULL = """\
name: nightly
limit: 'lab:!pi4-03'
steps:
  - health:
      min_free_mb: 64
      limits:
        - name: temperature
          command: cat /sys/class/thermal/thermal_zone0/temp
          scale: 0.001
          unit: C
          max: 85
        - {name: volts, command: vcgencmd measure_volts, min: 0.8, max: 1.4}
    timeout: 60
  - name: build
    push:
      kernels: kernels
      models: [models/m.npz]
      smoke: changed
      mace_format: legacy
      mace_version: null
      keep: 2
    timeout: 900
    retries: 1
    continue_on_error: false
  - smoke:
      kernels: ./kernels/
  - collect:
      paths: ['~/model/**/mace_cl_compiled_program.bin', /tmp/mace_run/**/*.bin]
  - name: clock
    shell:
      command: cat /proc/loadavg
      metrics:
        regex: '^(?P<load1>[0-9.]+) (?P<load5>[0-9.]+)'
        units: {load1: '', load5: ''}
      expect_exit: 0
    timeout: 30
    continue_on_error: true
"""


def test_full_example(root: Path) -> None:
    playbook = load(root, FULL)
    kernels, model = root / "kernels", root / "models" / "m.npz"
    metrics = MetricsSpec("^(?P<load1>[0-9.]+) (?P<load5>[0-9.]+)", False, {"load1": "", "load5": ""})
    assert playbook == Playbook("nightly", root / "pb.yml", hashlib.sha256(FULL.encode()).hexdigest(), "lab:!pi4-03", (
        Step("health", "health", 4, 60.0, 1, False, HealthStep(64, (
            Limit("temperature", "cat /sys/class/thermal/thermal_zone0/temp", 0.001, "C", None, 85.0),
            Limit("volts", "vcgencmd measure_volts", 1.0, "", 0.8, 1.4),
        ))),
        Step("build", "push", 14, 900.0, 1, False, PushStep(kernels, (model,), "changed", "legacy", None, 2)),
        Step("smoke", "smoke", 25, 600.0, 1, False, SmokeStep(kernels, ())),
        Step("collect", "collect", 27, 300.0, 1, False, CollectStep(
            ("~/model/**/mace_cl_compiled_program.bin", "/tmp/mace_run/**/*.bin"))),
        Step("clock", "shell", 29, 30.0, 1, True, ShellStep("cat /proc/loadavg", metrics, 0)),
    ))


def test_defaults_per_kind(root: Path) -> None:
    text = HEAD + "  - health:\n  - push: {kernels: kernels}\n  - smoke: {kernels: kernels}\n  - collect:\n" + \
        "  - shell: {command: 'true'}\n"
    steps = load(root, text).steps
    assert [(s.name, s.timeout, s.retries, s.continue_on_error) for s in steps] == [
        ("health", 60.0, 1, False), ("push", 900.0, 1, False), ("smoke", 600.0, 1, False),
        ("collect", 300.0, 1, False), ("shell", 60.0, 1, False),
    ]
    assert steps[0].options == HealthStep(None, ())
    assert steps[1].options == PushStep(root / "kernels", (), "changed", "pb", None, 3)
    assert steps[3].options == CollectStep(())
    assert steps[4].options == ShellStep("true", None, 0)


def test_top_level_defaults_and_step_overrides(root: Path) -> None:
    text = "defaults: {timeout: 120, retries: 3, continue_on_error: true}\n" + HEAD + \
        "  - health:\n  - collect:\n    timeout: 5\n    retries: 0\n    continue_on_error: false\n"
    steps = load(root, text).steps
    assert [(s.timeout, s.retries, s.continue_on_error) for s in steps] == [(120.0, 3, True), (5.0, 0, False)]


def test_a_second_step_of_a_kind_with_a_name(root: Path) -> None:
    steps = load(root, HEAD + "  - collect:\n  - name: collect-again\n    collect: {paths: [/x]}\n").steps
    assert [(s.name, s.line) for s in steps] == [("collect", 3), ("collect-again", 4)]


def test_paths_start_at_the_playbooks_folder(root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (root / "sub").mkdir(exist_ok=True)
    monkeypatch.chdir(tmp_path)  # not the playbook's folder
    step = load(root, HEAD + "  - smoke: {kernels: ../kernels, models: [../models/m.npz]}\n", "sub/pb.yml").steps[0]
    assert step.options == SmokeStep(root / "kernels", (root / "models" / "m.npz",))


def test_home_in_a_path(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(root))
    assert only_step(root, "  - smoke: {kernels: ~/kernels}\n").options == SmokeStep(root / "kernels", ())


def test_a_multi_line_shell_command_and_json_metrics(root: Path) -> None:
    step = only_step(root, """\
      - shell:
          command: |
            cd /tmp
            printf '{"fps": 31.5}\\n'
          metrics: {json: true, units: {fps: frames/s}}
          expect_exit: 3
    """)
    command = "cd /tmp\nprintf '{\"fps\": 31.5}\\n'\n"
    assert step.options == ShellStep(command, MetricsSpec(None, True, {"fps": "frames/s"}), 3)
    assert describe(step) == "shell `cd /tmp`, metrics from json, expect exit 3 (timeout 60 s, retries 1)"


def test_merge_keys_in_steps(root: Path) -> None:
    steps = load(root, HEAD + "  - &h {name: a, health: , timeout: 9}\n  - <<: *h\n    name: b\n").steps
    assert [(s.name, s.timeout) for s in steps] == [("a", 9.0), ("b", 9.0)]


def test_describe(root: Path) -> None:
    steps = load(root, HEAD + """\
  - health:
      limits:
        - {name: volts, command: x, min: 0.8, max: 1.4, unit: V}
        - {name: fan, command: y, min: 1000}
  - push: {kernels: kernels, smoke: never, mace_format: legacy, mace_version: v1.1.1, keep: 5}
    continue_on_error: true
  - smoke: {kernels: kernels, models: [models/m.npz, models/m.npz]}
  - collect: {paths: [/a, '~/b']}
  - shell: {command: 'echo this command line is rather longer than forty characters'}
    retries: 0
    timeout: 2.5
""").steps
    assert [describe(s) for s in steps] == [
        "health reachable, opencl, volts 0.8..1.4 V, fan >= 1000 (timeout 60 s, retries 1)",
        "push kernels/, smoke never, mace legacy, mace_version v1.1.1, keep 5 (timeout 900 s, retries 1, continue "
        "on error)",
        "smoke kernels/ + 2 models (timeout 600 s, retries 1)",
        "collect /a, ~/b (timeout 300 s, retries 1)",
        "shell `echo this command line is rather long...` (timeout 2.5 s, retries 0)",
    ]


def test_records_are_immutable(root: Path) -> None:
    playbook = load(root, FULL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        playbook.steps[0].timeout = 1.0  # type: ignore[misc]
    shell = playbook.steps[-1].options
    assert isinstance(shell, ShellStep) and shell.metrics is not None
    with pytest.raises(TypeError):
        shell.metrics.units["load1"] = "x"  # type: ignore[index]


def test_parse_playbook_without_a_file(root: Path) -> None:
    playbook = parse_playbook(HEAD + "  - smoke: {kernels: kernels}\n", root / "virtual.yml")
    assert playbook.sha256 == hashlib.sha256((HEAD + "  - smoke: {kernels: kernels}\n").encode()).hexdigest()
    assert playbook.steps[0].options == SmokeStep(root / "kernels", ())


# --- any input: a playbook or a PlaybookError that says where ----------------------------------------------

FRAGMENTS = [
    "name: n", "steps:", "  - health:", "  - push: {kernels: kernels}", "  - smoke:", "      kernels: kernels",
    "  - collect: {paths: [/x]}", "  - shell: {command: x, metrics: {regex: '(?P<a>'}}", "    timeout: 5",
    "    retries: 9", "  - name: a", "      limits: [{name: t, command: c, max: .nan}]", "defaults: {retries: 1}",
    "limit: all", "  - &s {health: }", "  - *s", "  - <<: *s", "    name: 7", "- x", "[", "\t", "steps: []",
]


def check_loads_or_says_where(root: Path, source: str) -> None:
    file = root / "any.yml"
    try:
        playbook = parse_playbook(source, file)
    except PlaybookError as error:
        assert error.where is not None and error.where.file == str(file) and error.where.line >= 1
        assert re.match(rf"{re.escape(str(file))}:\d+: ", str(error)), str(error)
    else:
        assert playbook.steps and all(describe(step) for step in playbook.steps)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_any_text(root: Path, source: str) -> None:
    check_loads_or_says_where(root, source)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=12))
def test_any_yaml_fragments(root: Path, lines: list[str]) -> None:
    check_loads_or_says_where(root, "\n".join(lines) + "\n")
