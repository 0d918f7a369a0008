"""The `env` op: the inventory's `env:` map, received over the channel (docs/design.md, section 2).

It travels in a request rather than on the remote command line, where every user of a board can read it in
/proc. The agent puts it in its own environment before any other op, so the OpenCL child processes (where
drivers read their variables), the driver stamp and `shell` commands all see it.
"""

import os
import re

from .framing import bad_request, show

# The environment the agent started in, before `env`: the shell's no-op check (remote/noop.py) runs its probe
# in the login environment, so the agent runs it there too
LOGIN_ENV = dict(os.environ)
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_VARIABLES = 256
MAX_VALUE = 1 << 16


def parse_env(req):
    """The request's `env` mapping, checked: names as the shell's, text values without NUL."""
    env = req.get("env")
    if not isinstance(env, dict) or len(env) > MAX_VARIABLES:
        raise bad_request("env: expected an object of at most %d variables" % MAX_VARIABLES)
    for name, value in env.items():
        if not NAME.match(name):
            raise bad_request("env: %s is not a variable name" % show(name))
        if not isinstance(value, str) or "\0" in value or len(value) > MAX_VALUE:
            # the value may be a secret: the error names the variable, never the value
            raise bad_request("env %s: expected text without NUL, at most %d characters" % (name, MAX_VALUE))
    return env


def op_env(req, payload):
    os.environ.update(parse_env(req))
    return {"variables": len(req["env"])}, b""
