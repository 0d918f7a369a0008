"""The one way commands show what they found: board and file text made visible, JSON documents whole.

Every string a command prints that came from a board (file names, program keys, build logs, error messages,
fingerprint strings, collected paths) or from a user's file goes through `shown`: control characters
(escape sequences that clear the screen or retitle the window, bells, carriage returns) become visible
`\\x1b`-style escapes, and Rich markup in it is escaped, so it prints as the text it is. `--json` documents
go through `emit_json` (docs/json.md): JSON escapes the C0 controls itself, and `emit_json` DEL and the C1
controls (U+0080-009F: U+009B is an 8-bit CSI) that a board's own file can carry into a document.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from deployer.cli.app import stderr, stdout
from deployer.text import visible

if TYPE_CHECKING:
    from deployer.config.inventory import Device
    from deployer.tasks.progress import Progress
    from deployer.tasks.runner import FleetOutcome

_C1 = re.compile("[\x7f-\x9f]")  # what JSON leaves raw with ensure_ascii=False and a terminal acts on
MAX_SHOWN = 8000  # characters of one value: a board's multi-megabyte log is cut, not scrolled


def shown(value: object, limit: int = MAX_SHOWN) -> str:
    """A value for a Rich console: made visible, then its markup escaped."""
    from rich.markup import escape  # Rich only when something is shown (cli/app.py LazyConsole)

    return escape(visible(str(value), limit))  # deployer.text: the one implementation, shared with the boundary


def emit_json(document: Mapping[str, Any]) -> None:
    """One JSON document on stdout (`--json` in every command): as Rich's print_json laid it out (indent 2,
    text as it is), written directly: Rich renders every token as a styled segment, ~54 ms of CPU for the
    document of 8 devices against ~1 ms, and it grows with the fleet (bench/README.md, issue 18)."""
    out = stdout.file
    text = json.dumps(document, indent=2, ensure_ascii=False)  # a raw one can only be inside a JSON string:
    out.write(_C1.sub(lambda m: f"\\u{ord(m.group()):04x}", text) + "\n")  # its \\u escape is the same text
    out.flush()


def device_line(name: str, verdict: str, color: str, detail: str | None = None) -> None:
    """`name: verdict detail`, the plain per-device line of the commands without a table."""
    stdout.print(f"{shown(name)}: [{color}]{verdict}[/{color}]" + (f" {shown(detail)}" if detail else ""))


def fleet_progress(devices: Sequence[Device], title: str, quiet: bool) -> Progress:
    """What every fleet command shows on stderr while it runs: a live table on a terminal, plain lines when
    stderr is a log, nothing with --quiet."""
    from deployer.tasks.progress import make_progress

    return make_progress(stderr, [d.name for d in devices], title=title, quiet=quiet)


def finish_fleet(result: FleetOutcome[Any], *, as_json: bool, plain: Callable[[], None],
                 **document: Any) -> NoReturn:
    """Every fleet command's ending: its JSON document (docs/json.md: `schema_version`, `ok`, `interrupted`,
    `devices`, and the command's own fields) or its plain summary, then its exit code: 0 every device
    passed, 1 one did not, 130 interrupted (after the summary: what each device did, none left half-way)."""
    if as_json:
        emit_json({"schema_version": 1, "ok": result.ok, **document, "interrupted": result.interrupted,
                   "devices": [o.to_json() for o in result.outcomes]})
    else:
        plain()
    if result.interrupted:
        stderr.print("deploy: interrupted")
        raise typer.Exit(130)
    raise typer.Exit(0 if result.ok else 1)
