"""`deploy connections`: this user's connection master (`ssh.persist`): what it holds, and stopping it."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from deployer.cli.app import JsonOption, app, stdout
from deployer.cli.render import emit_json, shown
from deployer.errors import LocalStateError


@app.command("connections")
def connections(
    stop: Annotated[bool, typer.Option("--stop", help="Close every connection it holds and end it (as "
                                       "`ssh -O exit`); the next run with ssh.persist starts a new one.")] = False,
    as_json: JsonOption = False,
) -> None:
    """The connection master that keeps devices' SSH connections open between runs (devices with ssh.persist):
    its process, the connections it holds, how many runs reused them."""
    from deployer.connect import mux, muxwire

    digest = muxwire.code_digest()
    path = muxwire.socket_path(digest)
    try:
        if path.parent.exists():
            muxwire.own_folder(path.parent, create=False)
        answer = mux.stop_master(path, digest) if stop else mux.hello(path, digest)
    except (muxwire.Foreign, OSError) as exc:
        raise LocalStateError(f"connection master at {path}: {exc}") from None
    if as_json:
        emit_json(_document(str(path), answer, stop))
    elif answer is None:
        stdout.print(f"no connection master at {shown(path)}")
    else:
        stdout.print(f"connection master at {shown(path)}: pid {answer.get('pid')}, {answer.get('held')} "
                     f"connection(s) held, {answer.get('handshakes')} opened, {answer.get('reuses')} reused"
                     + ("; stopped" if stop else ""))
        for held in answer.get("connections", []) if not stop else []:
            stdout.print(f"  {shown(held.get('device'))}: idle {held.get('idle_s')} s of "
                         f"{held.get('persist_s')} s, {held.get('users')} command(s) running")


def _document(path: str, answer: dict[str, Any] | None, stopped: bool) -> dict[str, Any]:
    """docs/json.md, `deploy connections`."""
    fields = ("pid", "held", "handshakes", "reuses", "connections")
    return {"schema_version": 1, "socket": path, "running": answer is not None and not stopped,
            "stopped": answer is not None and stopped, **{k: (answer or {}).get(k) for k in fields}}
