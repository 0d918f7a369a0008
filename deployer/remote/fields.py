"""Typed reads of a request's fields: a bad field is a `bad_request` naming it, never a traceback."""

from .framing import bad_request, show
from .layout import DEFAULT_TIMEOUT_S

MISSING = object()


def req_field(req, name, default):
    value = req.get(name, default)
    if value is MISSING:
        raise bad_request("missing field '%s'" % name)
    return value


def req_str(req, name, default=MISSING, pattern=None):
    value = req_field(req, name, default)
    if value is None and default is None:
        return None
    if not isinstance(value, str) or "\0" in value:
        raise bad_request("field '%s': expected a string (got %s)" % (name, show(value)))
    if pattern is not None and not pattern.fullmatch(value):
        raise bad_request("field '%s': %r does not match %s" % (name, value, pattern.pattern))
    return value


def req_int(req, name, default=MISSING, lo=None, hi=None):
    value = req_field(req, name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request("field '%s': expected an integer (got %s)" % (name, show(value)))
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad_request("field '%s': %d is out of range [%s, %s]" % (name, value, lo, hi))
    return value


def req_str_list(req, name, default=MISSING):
    value = req_field(req, name, default)
    if not isinstance(value, list) or not all(isinstance(v, str) and "\0" not in v for v in value):
        raise bad_request("field '%s': expected a list of strings (got %s)" % (name, show(value)))
    return value


def req_timeout(req):
    value = req.get("timeout_s")
    value = DEFAULT_TIMEOUT_S if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86400:
        raise bad_request("field 'timeout_s': expected seconds in (0, 86400] (got %s)" % show(value))
    return float(value)
