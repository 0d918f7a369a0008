"""deployer: push OpenCL kernels to a fleet of boards, compile them there, cache and smoke-test the binaries."""
