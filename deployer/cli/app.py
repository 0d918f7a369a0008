"""The Typer app, its command groups and shared options, and the consoles every command prints through.

Heavy modules (paramiko, numpy, the push stages) are imported inside commands: `deploy --help` stays fast.
"""

from __future__ import annotations

import os
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any

import click
import typer
from typer.core import TyperGroup

if TYPE_CHECKING:
    from rich.console import Console

    from deployer.config.inventory import Device


DEFAULT_SIM_DIR = Path(".deploy-sim")

# Each command and the module of deployer.cli that adds it, in the order `deploy --help` lists them. A command
# imports only its own module (cli/main.py): the others, and what they import, would cost every start.
COMMANDS = {"push": "push", "rollback": "push", "collect": "collect", "compare": "history", "report": "report",
            "run": "run", "inventory": "inventory", "sim": "sim", "cache": "cache", "history": "history",
            "connections": "connections"}


class _Listed(TyperGroup):
    """Commands in COMMANDS' order, however many modules were imported, in whatever order."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        order = list(COMMANDS)
        return sorted(self.commands, key=lambda name: order.index(name) if name in order else len(order))


app = typer.Typer(cls=_Listed, add_completion=False, rich_markup_mode=None, no_args_is_help=True,
                  pretty_exceptions_enable=False,
                  help="Push OpenCL kernels and models to a fleet of boards, compile them there, "
                       "cache the binaries in MACE's format and smoke-test them.")

inventory_app = typer.Typer(no_args_is_help=True, help="Check and list a device inventory.")

sim_app = typer.Typer(no_args_is_help=True, help="A simulated fleet of real SSH servers (sshd or dropbear).")

app.add_typer(inventory_app, name="inventory")

app.add_typer(sim_app, name="sim")


class SimServer(str, Enum):
    openssh = "openssh"
    dropbear = "dropbear"


class MaceFormat(str, Enum):
    pb = "pb"
    legacy = "legacy"


class SmokeMode(str, Enum):
    changed = "changed"
    always = "always"
    never = "never"

class LazyConsole:
    """A Rich console made on first use: a run that prints only JSON and plain progress lines (a no-op push
    from cron or CI) never imports Rich (~45 ms of its start). Whether it is a terminal is answered without
    Rich when Rich's answer cannot differ: not a tty, and none of the variables that force one."""

    _FORCING = ("FORCE_TERMINAL", "FORCE_COLOR", "TTY_INTERACTIVE", "TTY_COMPATIBLE", "JPY_PARENT_PID")

    def __init__(self, *, stderr: bool = False) -> None:
        self._stderr = stderr
        self._console: Console | None = None
        self._lock = threading.Lock()  # worker threads print too: one console, made once

    @property
    def console(self) -> Console:
        with self._lock:
            if self._console is None:
                from rich.console import Console

                # Off a terminal (logs, CI, pipes) Rich would assume 80 columns and fold the summary table.
                width = None if self._stderr or self.file.isatty() else 160
                self._console = Console(stderr=self._stderr, highlight=False, soft_wrap=True, width=width)
            return self._console

    @property
    def file(self) -> IO[str]:
        """Where it writes: the stream of this moment (a test may swap sys.stdout), as Rich's own does."""
        if self._console is not None:
            return self._console.file
        return sys.stderr if self._stderr else sys.stdout

    @property
    def is_terminal(self) -> bool:
        isatty = getattr(self.file, "isatty", None)
        if self._console is None and not (isatty and isatty()) and not any(map(os.environ.get, self._FORCING)):
            return False
        return self.console.is_terminal

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console, name)


stderr = LazyConsole(stderr=True)
stdout = LazyConsole()

FleetOption = Annotated[Path, typer.Option("--fleet", "-f", help="The inventory: our YAML, an Ansible inventory "
                                           "(INI, YAML or a folder), MACE's devices.yml, or ssh:alias,alias.")]


class FleetFormat(str, Enum):
    deploy = "deploy"
    ansible = "ansible"
    ansible_ini = "ansible-ini"
    ansible_yaml = "ansible-yaml"
    mace = "mace"
    ssh = "ssh"


FleetFormatOption = Annotated[FleetFormat | None, typer.Option("--fleet-format", help="The --fleet's format; "
                                                               "default: told by its content.")]

LimitOption = Annotated[str | None, typer.Option("--limit", "-l", help="Devices: names, groups, globs, "
                                                 "a,b lists, !exclusions; @failed: those that failed the "
                                                 "last push on this cache.")]

# The inventory commands read no cache, so they offer no @failed/@passed.
InventoryLimitOption = Annotated[str | None, typer.Option("--limit", "-l", help="Devices: names, groups, globs, "
                                                          "a,b lists, !exclusions.")]

QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr (the summary or JSON "
                                       "still goes to stdout).")]

JsonOption = Annotated[bool, typer.Option("--json", help="One JSON object on stdout (docs/json.md).")]

SimDirOption = Annotated[Path, typer.Option("--dir", help="Folder of the simulated fleet.")]

ForksOption = Annotated[int, typer.Option("--forks", min=1, max=256, help="Devices worked on at once.")]
AcceptNewOption = Annotated[bool, typer.Option("--accept-new-host-keys", help="Trust and record the key of a "
                                               "device never seen before (a changed key is always refused).")]
WaitOption = Annotated[float, typer.Option("--wait", min=0, help="If another run holds the cache, wait up to "
                                           "this many seconds for it instead of refusing at once.")]


def select_devices(fleet: Path, limit: str | None, cache: Path | None = None,
                   form: FleetFormat | None = None) -> list[Device]:
    """The devices of `--limit`; with a cache, `@failed`/`@passed` name the devices of its last run."""
    from deployer.cache.store import last_run_sets
    from deployer.cli.render import shown  # render imports this module's consoles
    from deployer.config.inventory import load_inventory
    from deployer.config.selection import select

    inventory = load_inventory(fleet, form.value if form is not None else None)
    for note in inventory.notes:  # read but not used (a devices.yml password): said, never silently dropped
        stderr.print(f"deploy: note: {shown(note)}")
    return list(select(inventory, limit, named_sets=last_run_sets(cache) if cache else None))
