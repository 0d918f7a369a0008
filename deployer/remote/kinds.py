"""Every error kind a result can carry: one vocabulary for the board and the controller.

The agent replies with `AGENT` kinds; the controller adds its own (`CONTROLLER`) for what it finds wrong
with a board's answers or its absence of one. docs/design.md (section 2) lists exactly these, and a test
holds both the list and every kind the code raises to this module. Python >= 3.6, standard library only:
the board imports it too.
"""

AGENT = {
    "bad_request": "a request the agent cannot act on (a field missing, of a wrong type or out of range)",
    "locked": "another deploy holds the device's lock",
    "io": "the board's file system refused (disk full, read-only, permission): the OS message is kept",
    "checksum": "bytes that do not hash to what was announced",
    "no_loader": "no OpenCL ICD loader (libOpenCL.so.1) on the board",
    "icd_missing_library": "an ICD file names a driver library that is not there",
    "no_platform": "the loader finds no OpenCL platform",
    "no_device": "the selected platform has no device of the wanted type",
    "no_match": "no platform or device matches the inventory's opencl selection",
    "binary_mismatch": "a binary differs from the one the build reported",
    "driver_crash": "the OpenCL child died of a signal (the driver crashed)",
    "opencl": "any other OpenCL error code, named",
    "moved": "the release the push planned on is no longer current (another controller committed)",
    "reuse_missing": "a binary to reuse is missing from the base release",
    "no_blob": "a stored input blob is not on the board any more",
    "no_release": "nothing is deployed on the device",
    "no_previous": "no older release to roll back to",
    "read_only": "a check-only session was asked to write",
    "changed": "a file changed while it was read (collect)",
    "nondeterministic": "a model gave different outputs for the same inputs",
    "timeout": "an OpenCL step ran past its time limit and was stopped",
    "internal": "a bug in the agent, reported instead of crashing",
}

CONTROLLER = {
    "build_failed": "a program did not compile (the driver's log is kept)",
    "bad_reply": "a reply that breaks the protocol: malformed, over its size limit, a field out of range",
    "bad_cache": "a pulled cache file that is not a valid MACE container",
    "bad_manifest": "a pulled build manifest that is not what the agent writes",
    "no_python": "the board's python is missing or cannot run",
    "agent_died": "the agent ended without an answer (killed, crashed)",
    "need_agent": "the agent is not on the device yet (it is then uploaded)",
}

KINDS = dict(AGENT, **CONTROLLER)
