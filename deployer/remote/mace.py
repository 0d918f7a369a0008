"""MACE's compiled-program cache file: the key and hash rules, and the container codec (both generations).

The agent writes the file on the board; the controller imports the same encoder and decoder from here
(docs/mace.md says which MACE versions read which form).
"""

import hashlib
import struct
import zlib

MYPY = False
if MYPY:  # type comments only: typing is not imported on the board
    from typing import Iterable  # noqa: F401

PLATFORM_INFO_KEY = "mace_opencl_precompiled_platform_info_key"

DEVICE_NAME_KEY = "mace_opencl_precompiled_device_name_key"

PROGRAM_HASH_PREFIX = "program_hash_ "  # a space follows the underscore, as in MACE

def mace_program_key(name, options):
    # type: (str, Iterable[str]) -> str
    """MACE's key: the program name, then a space and each option of the (bytewise sorted) set."""
    return name + "".join(" " + opt for opt in sorted(set(options)))


def mace_program_hash(source_bytes, header_bytes_list):
    # type: (bytes, Iterable[bytes]) -> str
    """Last 10 hex digits of the source's MD5, then the last 10 of each header's, in order."""
    return "".join(hashlib.md5(b).hexdigest()[-10:] for b in [source_bytes] + list(header_bytes_list))


def mace_platform_info(name, profile, version, mace_version):
    # type: (str, str, str, str) -> str
    return "%s, %s, %s, %s" % (name, profile, version, mace_version)


def mace_device_name(device_name, device_version):
    # type: (str, str) -> str
    """MACE's device-name entry: Adreno names come from CL_DEVICE_VERSION, Mali/PowerVR from
    CL_DEVICE_NAME, every other GPU gets an empty name."""
    if device_name == "QUALCOMM Adreno(TM)":
        parts = device_version.split(" ", 2)  # "OpenCL 2.0 Adreno(TM) 640" -> "Adreno(TM) 640"
        return parts[2] if len(parts) == 3 else ""
    if "Mali" in device_name or "PowerVR" in device_name:
        return device_name
    return ""


def _varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(tag, data):
    return bytes([tag]) + _varint(len(data)) + data


def encode_mace_pb(pairs):
    # type: (Iterable[tuple[str, bytes]]) -> bytes
    """Encode (key, bytes) pairs as MACE's PairContainer + CRC-32 trailer, keys in bytewise order."""
    encoded = []
    for key, value in pairs:
        if not isinstance(key, str) or not isinstance(value, (bytes, bytearray)):
            raise TypeError("pairs must be (str, bytes), got (%r, %r)" % (type(key), type(value)))
        encoded.append((key.encode("utf-8"), bytes(value)))
    encoded.sort(key=lambda kv: kv[0])
    for (a, _), (b, _) in zip(encoded, encoded[1:]):
        if a == b:
            raise ValueError("duplicate key %r" % a.decode("utf-8"))
    body = b"".join(
        _length_delimited(0x0A, _length_delimited(0x0A, k) + _length_delimited(0x12, v)) for k, v in encoded
    )
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


def _read_varint(data, pos, end):
    """Decode a varint at data[pos:end]; return (value, new pos). Never reads at or past `end`."""
    value, shift = 0, 0
    while True:
        if pos >= end:
            raise ValueError("varint runs past the end at offset %d" % pos)
        if shift >= 64:
            raise ValueError("varint longer than 10 bytes at offset %d" % pos)
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _read_bytes(data, pos, end):
    length, pos = _read_varint(data, pos, end)
    if length > end - pos:
        raise ValueError("length %d at offset %d runs past the end of its message" % (length, pos))
    return data[pos:pos + length], pos + length


def _read_uint32(data, pos, end):
    value, pos = _read_varint(data, pos, end)
    if value > 0xFFFFFFFF:
        raise ValueError("uint32 value %d out of range at offset %d" % (value, pos))
    return value, pos


def _decode_kv(data, pos, end):
    """One KVPair in data[pos:end]: (key, value); uint32s come back as little-endian bytes."""
    key, value, uints = None, None, []
    while pos < end:
        tag_at = pos
        tag, pos = _read_varint(data, pos, end)
        if tag in (0x0A, 0x12):
            raw, pos = _read_bytes(data, pos, end)
            if (key if tag == 0x0A else value) is not None:
                raise ValueError("field %d repeated in one pair at offset %d" % (tag >> 3, tag_at))
            if tag == 0x0A:
                try:
                    key = bytes(raw).decode("utf-8")
                except UnicodeDecodeError:
                    raise ValueError("key at offset %d is not UTF-8" % tag_at) from None
            else:
                value = bytes(raw)
        elif tag == 0x18:  # repeated uint32, one varint per element (proto2, not packed)
            number, pos = _read_uint32(data, pos, end)
            uints.append(number)
        else:
            raise ValueError("unexpected field/wire type 0x%x in a pair at offset %d" % (tag, tag_at))
    if key is None:
        raise ValueError("pair without a key ending at offset %d" % end)
    if value is None:
        value = struct.pack("<%dI" % len(uints), *uints)
    return key, value


def decode_mace_pb(data, check_crc=True):
    # type: (bytes, bool) -> list[tuple[str, bytes]]
    """Strictly decode a MACE v1.1+ container into a list of (key, bytes) in file order.

    Raises ValueError with the reason on a bad CRC, a length past its bound, an unknown field, a pair
    without key, or anything else malformed. `check_crc=False` only serves to say which entry differs
    in a file whose CRC already failed; its entries are never trusted.
    """
    view = memoryview(bytes(data))
    if len(view) < 4:
        raise ValueError("file of %d bytes is too short for the CRC-32 trailer" % len(view))
    end = len(view) - 4
    (want,) = struct.unpack("<I", view[end:].tobytes())
    if check_crc and zlib.crc32(view[:end]) & 0xFFFFFFFF != want:
        raise ValueError("crc mismatch")
    pairs, pos = [], 0
    while pos < end:
        tag_at = pos
        tag, pos = _read_varint(view, pos, end)
        if tag != 0x0A:
            raise ValueError("unexpected top-level field/wire type 0x%x at offset %d" % (tag, tag_at))
        length, pos = _read_varint(view, pos, end)
        if length > end - pos:
            raise ValueError("pair of %d bytes at offset %d runs past the end" % (length, tag_at))
        pairs.append(_decode_kv(view, pos, pos + length))
        pos += length
    return pairs


def decode_mace_legacy(data):
    # type: (bytes) -> list[tuple[str, bytes]]
    """Strictly decode a legacy container: every length within bounds, nothing left over (MACE v1.0
    itself aborts on overruns)."""
    data = bytes(data)
    if len(data) < 8:
        raise ValueError("%d bytes: too short for the legacy count" % len(data))
    (count,) = struct.unpack_from("<q", data, 0)
    if not 0 <= count <= (len(data) - 8) // 8:
        raise ValueError("legacy count %d does not fit in %d bytes" % (count, len(data)))
    pairs, pos = [], 8
    for index in range(count):
        fields = []
        for what in ("key", "value"):
            if pos + 4 > len(data):
                raise ValueError("entry %d: %s length runs past the end" % (index, what))
            (size,) = struct.unpack_from("<i", data, pos)
            pos += 4
            if size < 0 or pos + size > len(data):
                raise ValueError("entry %d: %s of %d bytes runs past the end" % (index, what, size))
            fields.append(data[pos:pos + size])
            pos += size
        try:
            pairs.append((fields[0].decode("utf-8"), fields[1]))
        except UnicodeDecodeError as exc:
            raise ValueError("entry %d: key is not UTF-8" % index) from exc
    if pos != len(data):
        raise ValueError("%d bytes left over after %d entries" % (len(data) - pos, count))
    return pairs


def decode_any(data):
    # type: (bytes) -> tuple[str, list[tuple[str, bytes]]]
    """(format, pairs) of either generation. No magic number tells them apart: a valid CRC-32 trailer
    says pb, an exact legacy parse says legacy; ValueError naming both reasons otherwise."""
    try:
        return "pb", decode_mace_pb(data)
    except ValueError as pb_error:
        try:
            return "legacy", decode_mace_legacy(data)
        except ValueError as legacy_error:
            raise ValueError("not a MACE container (pb: %s; legacy: %s)" % (pb_error, legacy_error)) from None


def encode_mace_legacy(pairs):
    # type: (list[tuple[str, bytes]]) -> bytes
    """MACE v0.6.1 to v1.0.4: int64 count, then (int32 key length, key, int32 value length, value),
    little-endian, no checksum. Pairs in ascending key order, as MACE's std::map writes them."""
    out = [struct.pack("<q", len(pairs))]
    for key, value in sorted(pairs):
        raw = key.encode("utf-8")
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<i", len(value)), value]
    return b"".join(out)
