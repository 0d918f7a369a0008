"""deployer: push OpenCL kernels to a fleet of boards, compile them there, cache and smoke-test the binaries."""

# Here, not in mace.py, so that the CLI's help text can show it without importing the agent (~45 ms).
DEFAULT_MACE_VERSION = "v1.1.1-0-g8c75d39"  # MaceVersion() of the libmace an app links, when none is given
