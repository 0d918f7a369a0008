"""The agent: the program that runs ON THE BOARD (docs/design.md, sections 1-3 and the package map).

Constraints, because it runs on whatever Python the board has: Python >= 3.6, standard library only,
OpenCL only through ctypes and the ICD loader, nothing imported from the rest of `deployer` (import-linter
and vermin check this). The controller ships this package as one bundle (bundle.py) and imports from it
only the pure codecs both sides share: framing, the MACE container, the bundle identity, LAUNCH/BOOTSTRAP.

    main      `serve RD` (a session) or `child` (one OpenCL request, so a driver crash kills only the child)
    session   the ops of one session, the release being written, the lock, commit and rollback
    framing   the wire: one JSON line, then an optional payload; error replies
    fields    typed reads of request fields
    layout    the remote dir's layout and the agent's limits
    fs        paths kept inside a root, atomic writes
    opencl    the ctypes binding of libOpenCL.so.1;  selection: platform/device choice, the fingerprint
    build     compile programs, write the cache file and manifest;  mace: the container codec
    smoke     run kernels from the cached binaries;  startup: start-up figures and model runs
    child     the OpenCL child process;  stamp: the driver stamp;  releases, blobs: incremental pushes
    collect   find/read/install: the caches apps wrote;  bundle: identity and pruning;  boot: LAUNCH, BOOTSTRAP
    phases    named points of the commit protocol, observed by the tests only

Nothing is written outside RD (except `install`, at the path the user named): request paths are relative,
without `..`, and their realpath must stay inside the release. Every file is written to a temp name,
fsynced and renamed.
"""
