"""`deploy`'s entry point: the one place that turns an error into a message and an exit code.

Exit codes (the table of every command: docs/design.md, section 14): 0 every selected device passed;
1 some device failed (the summary says which and why; `deploy run`: new failures); 2 bad input, found
before any device is touched; 3 local state unusable (the cache, the history database) or held by
another run; 70 a bug (one line on screen, the traceback saved to a file); 130 interrupted.
"""

from __future__ import annotations

import importlib
import signal
import sys
import tempfile
import threading
import traceback
from typing import Any

import typer

from deployer.cli.app import COMMANDS, app, stderr
from deployer.cli.render import shown
from deployer.errors import DeployError, Interrupted


def _report_bug() -> int:
    with tempfile.NamedTemporaryFile("w", prefix="deploy-crash-", suffix=".txt", delete=False) as out:
        traceback.print_exc(file=out)
    kind = sys.exc_info()[0]
    stderr.print(f"deploy: internal error ({kind.__name__ if kind else 'unknown'}); "
                 f"traceback saved to {out.name}; please report it")
    return 70




def _interrupt(signum: int, frame: object) -> None:
    """Ctrl-C, raised past Typer's own handling (which would exit 1): a fan-out stops its devices and the
    command prints what each did before exiting 130 (tasks/fleet.py, FleetInterrupted)."""
    raise Interrupted


def _plain_metavars(command: Any, context: Any = None) -> None:
    """Short placeholders in `--help` (`N`, `PATH`, `TEXT`) for options that name none, instead of Typer's
    `<int range>` or `<list[Path]>`: with them an 80-column help keeps every flag whole."""
    context = context or command.make_context("deploy", [], resilient_parsing=True)
    for param in command.params:
        if param.param_type_name == "option" and param.metavar is None and not param.is_flag:
            param.metavar = _metavar_of(_type_shown(param, context))
        elif param.param_type_name == "argument":  # `RUN_A`, not `run_a <int>`: its help says what it is
            param.metavar = param.metavar or param.name.upper()
            param.display_type_rich = lambda ctx: None
    for sub in getattr(command, "commands", {}).values():
        _plain_metavars(sub, context)


def _type_shown(param: Any, context: Any) -> str:
    """Typer's `<type>` (0.26 and later), else Click's type name (`integer`, `path`, `choice`)."""
    display = getattr(param, "display_type", None)
    if display is not None:
        return str(display(context))
    return "a|b" if getattr(param.type, "choices", None) else str(param.type.name)


def _metavar_of(shown: str) -> str | None:
    """Typer's `<type>` as a plain placeholder; choices (`<a|b>`) already say all there is."""
    kind = shown.strip("<>").removeprefix("list[").removesuffix("]").lower()
    if "|" in kind:
        return None
    if kind.startswith("int"):
        return "N"
    if kind.startswith("float"):
        return "NUMBER"
    if kind in ("path", "file", "directory"):
        return "PATH"
    return "TEXT"


def load_commands(argv: list[str]) -> None:
    """Import the module of the command in `argv`, or every command's (`--help`, a typo, no command)."""
    first = next((word for word in argv if not word.startswith("-")), None)
    modules = [COMMANDS[first]] if first in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for module in modules:
        importlib.import_module(f"deployer.cli.{module}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the console script passes it to sys.exit).

    Typer runs in standalone mode: it prints usage errors itself and exits 2, as Click does."""
    previous = signal.signal(signal.SIGINT, _interrupt) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        load_commands(sys.argv[1:] if argv is None else argv)
        command = typer.main.get_command(app)
        _plain_metavars(command)
        command.main(args=argv, prog_name="deploy")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Interrupted:
        stderr.print("deploy: interrupted")
        return 130
    except DeployError as exc:
        stderr.print(f"deploy: {shown(str(exc))}")
        return exc.exit_code
    except Exception:
        return _report_bug()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return 0


def console_main() -> None:
    sys.exit(main())
