"""The remote dir's layout, and the limits the agent keeps (docs/design.md, section 3)."""

import re

AGENT_VERSION = "1"  # the protocol's version (the bundle's identity is its content: bundle.py)

MAX_MEMORY_PAYLOAD = 256 << 20  # payloads held in memory (smoke inputs); `put` streams to disk
MAX_GET = 256 << 20  # largest file `get` sends back
LOG_TAIL = 16 << 10  # build log text returned per program (the full log is in build/logs/)
DEFAULT_TIMEOUT_S = 600.0

CACHE_FILE = "build/mace_cl_compiled_program.bin"
MANIFEST_FILE = "build/manifest.json"
RELEASE_INDEX = "release.json"  # in each release: every file's size, sha256 and mode (written at commit)
FINGERPRINT_CACHE = "fingerprint.json"  # RD/: the last fingerprint and the driver stamp it was taken under
BLOB_DIR = "blobs"  # RD/blobs/<sha256>: smoke inputs and model bytes, kept by content across pushes
KEEP_BLOBS = 8
AGENT_DIR = "agent"  # RD/agent/<id12>/deployer_remote/: one folder per agent bundle (bundle.py)
KEEP_BUNDLES = 3  # the running bundle and the two used last are kept; older ones are pruned at commit
MAX_INDEX = 16 << 20  # the largest release index or manifest the agent reads back
NOOP_LINE = "noop"  # RD/noop: token, `current`'s target and the probe's checksum (remote/noop.py)
NOOP_PROBE = "noop.probe"  # RD/noop.probe: the shell script whose output decides the driver's fingerprint
NOOP_ANSWER = "noop.json"  # RD/noop.json: what the shell prints for an up-to-date push instead of `hello`
READONLY_ENV = "DEPLOYER_CHECK"  # set by `deploy push --check`: the agent writes nothing at all

RELEASE_ID_RE = re.compile(r"[A-Za-z0-9._-]+")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
BUILD_KEY_RE = re.compile(r"[0-9a-f]{16,64}")
