"""Smoke inputs and models kept by content in RD/blobs, so a later push sends only their hash."""

import hashlib
import json
import os

from .fields import req_int, req_str
from .framing import AgentFailure, bad_request
from .fs import read_file_limited, write_atomic
from .layout import BLOB_DIR, KEEP_BLOBS, MAX_MEMORY_PAYLOAD, SHA256_RE


def blob_path(rd, sha256):
    return os.path.join(rd, BLOB_DIR, sha256)


def stored_blobs(rd):
    try:
        return sorted(n for n in os.listdir(os.path.join(rd, BLOB_DIR)) if SHA256_RE.fullmatch(n))
    except OSError:
        return []


def blob_payload(rd, req, payload, store):
    """The bytes of a smoke/startup request: sent now (stored by hash when `blob` names it and `store`)
    or, with no payload, read back from RD/blobs/<blob> and checked."""
    want = req.get("blob")
    if want is None:
        return payload.read_all()
    want = req_str(req, "blob", pattern=SHA256_RE)
    path = blob_path(rd, want)
    if payload.size:
        data = payload.read_all()
        if hashlib.sha256(data).hexdigest() != want:
            raise AgentFailure("checksum", "payload does not match its blob sha256 %s" % want)
        if store:
            os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
            write_atomic(path, [data])
        return data
    try:
        data = read_file_limited(path, MAX_MEMORY_PAYLOAD, "blob " + want)
    except OSError:
        raise AgentFailure("no_blob", "blob %s is not on the device; send it with the request" % want) from None
    if hashlib.sha256(data).hexdigest() != want:
        os.unlink(path)
        raise AgentFailure("no_blob", "blob %s was damaged on the device and is removed; send it again" % want)
    if store:
        os.utime(path)  # recently used blobs survive pruning
    return data

BLOB_FIELDS = ("cases", "models")


def split_blob_fields(req, data):
    """A blob may start with `blob_json` bytes of JSON holding the request's large, stable fields (cases,
    models), so they too are sent once per content; the rest is the payload their offsets refer to.
    `run` then picks the cases (by id) or models (by name) this request runs."""
    size = req.get("blob_json")
    if size is None:
        return req, data
    size = req_int(req, "blob_json", lo=0, hi=len(data))
    try:
        fields = json.loads(data[:size].decode("utf-8"))
    except ValueError as exc:
        raise bad_request("blob_json: not JSON: %s" % exc) from None
    if not isinstance(fields, dict) or set(fields) - set(BLOB_FIELDS):
        raise bad_request("blob_json: expected an object of %s" % ", ".join(BLOB_FIELDS))
    req = dict(req, **fields)
    run = req.get("run")
    if run is not None:
        if not isinstance(run, list):
            raise bad_request("field 'run': expected a list of ids or names")
        chosen = set(str(r) for r in run)
        name = "cases" if req["op"] == "smoke" else "models"
        items = req.get(name) if isinstance(req.get(name), list) else []
        req[name] = [c for c in items if isinstance(c, dict) and str(c.get("id", c.get("name"))) in chosen]
    return req, data[size:]


def prune_blobs(rd, keep=KEEP_BLOBS):
    names = stored_blobs(rd)
    paths = sorted((os.path.join(rd, BLOB_DIR, n) for n in names), key=lambda p: os.stat(p).st_mtime,
                   reverse=True)
    for path in paths[keep:]:
        try:
            os.unlink(path)
        except OSError:
            pass
