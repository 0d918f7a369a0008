"""MACE's OpenCL cache file on the controller side: reading what devices and apps wrote.

The encoder and the key/hash rules live in `agent_main` (the agent writes the file on the device) and are
re-used here, so both sides follow one definition. Format: ../shared/docs/mace-cache-format.md, docs/mace.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from deployer.agent_main import (
    DEVICE_NAME_KEY,
    PLATFORM_INFO_KEY,
    decode_mace_pb,
    encode_mace_pb,
    mace_program_hash,
    mace_program_key,
)

# MACE compares the whole platform string, MaceVersion() included: this must match the app's libmace.
DEFAULT_MACE_VERSION = "v1.1.1-0-g8c75d39"
PROGRAM_HASH_PREFIX = "program_hash_ "

__all__ = [
    "DEFAULT_MACE_VERSION", "DEVICE_NAME_KEY", "PLATFORM_INFO_KEY", "MaceCache", "decode_mace_pb",
    "encode_mace_pb", "mace_program_hash", "mace_program_key", "parse_cache",
]


@dataclass(frozen=True, slots=True)
class MaceCache:
    programs: dict[str, bytes]
    hashes: dict[str, str]
    platform_info: str | None
    device_name: str | None


def parse_cache(data: bytes) -> MaceCache:
    """Split a v1.1+ cache file into programs and MACE's bookkeeping entries (ValueError if malformed)."""
    programs: dict[str, bytes] = {}
    hashes: dict[str, str] = {}
    platform = device = None
    for key, value in decode_mace_pb(data):
        if key == PLATFORM_INFO_KEY:
            platform = value.decode("utf-8", "replace")
        elif key == DEVICE_NAME_KEY:
            device = value.decode("utf-8", "replace")
        elif key.startswith(PROGRAM_HASH_PREFIX):
            hashes.setdefault(key[len(PROGRAM_HASH_PREFIX):], value.decode("ascii", "replace"))
        else:
            programs.setdefault(key, value)  # MACE: the first pair of a key wins
    return MaceCache(programs, hashes, platform, device)
