"""deployer: push OpenCL kernels to a fleet of boards, compile them there, cache and smoke-test the binaries."""

# Here, not in mace.py, so that the CLI's help text can show it without importing the agent (~45 ms).
DEFAULT_MACE_VERSION = "v1.1.1-0-g8c75d39"  # MaceVersion() of the libmace an app links, when none is given


def child_env() -> dict[str, str]:
    """The environment for a child `python -m deployer...` (the connection master, a sim proxy): this copy of
    deployer first on PYTHONPATH, so the child imports this very package wherever another copy is found."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
