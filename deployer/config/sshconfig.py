"""Read an OpenSSH client config (`~/.ssh/config`) for the few things deployer takes from it.

A small parser of our own, so that reading it never imports Paramiko (`deploy --help` must stay light).
It follows ssh_config(5) where it matters here:

- keywords are case-insensitive; `Keyword value` or `Keyword=value`; double or single quotes group words;
  a word that starts with `#` starts a comment;
- options before the first `Host` line apply to every host;
- `Host` lists patterns (`*` any run of characters, `?` one character, `!pattern` negated), matched
  case-insensitively against the name given to `resolve` (the alias, not the HostName); a block is skipped
  when one of its negated patterns matches, and applies when one of its other patterns matches;
- for each keyword the first value obtained wins, so specific blocks go first and `Host *` last.

Not supported, on purpose: `Match` blocks are skipped (except `Match all`), since their criteria (`exec`,
`localnetwork`, ...) need a live system; `Include` is ignored: deployer does not follow includes, so put the
hosts it needs in the main file or point the inventory's `ssh_config:` at a file of their own. Of the
%-tokens, `%%`, `%h`, `%n`, `%p`, `%r`, `%u` and `%d` are expanded; any other is left as written.
"""

from __future__ import annotations

import functools
import getpass
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from deployer.config.files import MAX_SSH_CONFIG, read_user_file
from deployer.errors import InputError, Where

DEFAULT_PATH = "~/.ssh/config"

# The keywords read, lower-case; every other keyword is skipped without a look at its value.
_WANTED = frozenset(
    {"hostname", "user", "port", "identityfile", "proxyjump", "userknownhostsfile", "stricthostkeychecking"}
)
_KEYWORD = re.compile(r"\s*([A-Za-z][A-Za-z0-9]*)(?:\s*=\s*|\s+|\Z)(.*)", re.DOTALL)
_TOKEN = re.compile(r"%(.)")


@dataclass(frozen=True, slots=True)
class SshHostConfig:
    """What the ssh config says about one host name; None where it says nothing (or `none`)."""

    alias: str
    hostname: str | None = None
    user: str | None = None
    port: int | None = None
    identity_file: str | None = None  # the first IdentityFile, `~` and tokens expanded
    proxy_jump: str | None = None  # as written: `[user@]host[:port]`, comma-separated
    user_known_hosts_file: str | None = None  # the first file listed, `~` and tokens expanded
    strict_host_key_checking: str | None = None  # lower-case: yes, no, ask, accept-new, off


@dataclass(frozen=True, slots=True)
class JumpHost:
    """One hop of a device's ProxyJump, resolved as OpenSSH would: what the hop says (`user@`, `:port`) wins,
    then the ssh config of its name (or the inventory device of that name), then the defaults."""

    spec: str  # the hop as written, for messages: `[user@]host[:port]`
    host: str  # the address to reach it at
    port: int
    user: str
    identity_file: str | None  # None: the default keys and the SSH agent


def parse_jump(spec: str) -> list[tuple[str | None, str, int | None]]:
    """The hops of a ProxyJump value (`[user@]host[:port]`, comma-separated, `ssh://` allowed, an IPv6
    address in brackets) as (user, host, port); raises ValueError saying what is wrong."""
    hops = []
    for raw in spec.split(","):
        text = raw.strip().removeprefix("ssh://")
        user, at, rest = text.rpartition("@")
        if at and not user:
            raise ValueError(f"empty user name in {raw.strip()!r}")
        port_text: str | None = None
        if rest.startswith("["):
            host, bracket, after = rest[1:].partition("]")
            if not bracket or (after and not after.startswith(":")):
                raise ValueError(f"expected [address]:port in {raw.strip()!r}")
            port_text = after[1:] if after else None
        elif rest.count(":") == 1:
            host, _, port_text = rest.partition(":")
        else:
            host = rest  # no port, or a bare IPv6 address
        if not host or any(c.isspace() or c in "/@[]" for c in host):
            raise ValueError(f"expected [user@]host[:port] (got {raw.strip()!r})")
        port = None
        if port_text is not None:
            if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 1 <= int(port_text) <= 65535:
                raise ValueError(f"port of {raw.strip()!r}: expected 1-65535")
            port = int(port_text)
        hops.append((user or None, host, port))
    return hops


@dataclass(frozen=True, slots=True)
class _Option:
    keyword: str  # lower-case
    value: str  # the first word after the keyword
    line: int


@dataclass(frozen=True, slots=True)
class _Block:
    """Options under one `Host` line; patterns None for a `Match` block, which never applies here."""

    patterns: tuple[str, ...] | None
    options: tuple[_Option, ...]

    def applies_to(self, host: str) -> bool:
        if self.patterns is None:
            return False
        host = host.lower()
        positive = False
        for pattern in self.patterns:
            negated = pattern.startswith("!")
            if _pattern_re(pattern.removeprefix("!")).fullmatch(host):
                if negated:
                    return False
                positive = True
        return positive


@dataclass(frozen=True, slots=True)
class SshConfig:
    """A parsed ssh config; `path` names it in messages (an empty config when the file does not exist)."""

    path: str
    blocks: tuple[_Block, ...] = ()

    def resolve(self, alias: str) -> SshHostConfig:
        """What applies to `alias`, first value winning for each keyword, as OpenSSH does."""
        found: dict[str, _Option] = {}
        for block in self.blocks:
            if block.applies_to(alias):
                for option in block.options:
                    found.setdefault(option.keyword, option)
        return _host_config(alias, found, self.path)


def parse_ssh_config(text: str, path: str = "<ssh_config>") -> SshConfig:
    """Parse the text of an ssh config; raises `InputError` (path:line) for a line it cannot read."""
    blocks: list[_Block] = []
    patterns: tuple[str, ...] | None = ("*",)  # what comes before the first Host applies to all
    options: list[_Option] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        parsed = _parse_line(raw, Where(path, number))
        if parsed is None:
            continue
        keyword, words = parsed
        if keyword in ("host", "match"):
            blocks.append(_Block(patterns, tuple(options)))
            patterns, options = _block_patterns(keyword, words, Where(path, number)), []
        elif keyword in _WANTED:
            options.append(_Option(keyword, words[0], number))
        # else: a keyword deployer does not use, `Include` among them (not followed: see the docstring)
    blocks.append(_Block(patterns, tuple(options)))
    return SshConfig(path, tuple(blocks))


def load_ssh_config(path: str | os.PathLike[str] | None = None) -> SshConfig:
    """Read `path` (default `~/.ssh/config`); a file that does not exist is an empty config."""
    file = os.path.expanduser(os.fspath(path if path is not None else DEFAULT_PATH))
    data = read_user_file(file, MAX_SSH_CONFIG, "ssh config")
    if data is None:
        return SshConfig(file)
    return parse_ssh_config(data.decode("utf-8", errors="replace"), file)


def resolve(alias: str, path: str | os.PathLike[str] | None = None) -> SshHostConfig:
    """What the ssh config at `path` (default `~/.ssh/config`) says about `alias`."""
    return load_ssh_config(path).resolve(alias)


def local_user() -> str:
    """The controller's login name, OpenSSH's default remote user."""
    try:
        return getpass.getuser()
    except (KeyError, OSError) as exc:  # no USER/LOGNAME and no passwd entry (KeyError before 3.13)
        problem = "cannot tell the local user name: set 'user' in the inventory"
        raise InputError(None, "user", problem) from exc


def _parse_line(raw: str, where: Where) -> tuple[str, list[str]] | None:
    """(lower-case keyword, words) of one line, or None for a blank or comment line."""
    stripped = raw.strip()
    if not stripped or stripped.startswith("#"):
        return None
    match = _KEYWORD.fullmatch(stripped)
    if match is None:
        raise InputError(where, None, f"cannot read this line (got {stripped[:60]!r})")
    keyword = match.group(1).lower()
    try:
        words = _split_words(match.group(2))
    except ValueError as exc:
        raise InputError(where, match.group(1), str(exc)) from None
    if (not words or not words[0]) and (keyword in _WANTED or keyword in ("host", "match")):
        raise InputError(where, match.group(1), "missing value")
    return keyword, words


def _block_patterns(keyword: str, words: list[str], where: Where) -> tuple[str, ...] | None:
    if keyword == "match":
        return ("*",) if [w.lower() for w in words] == ["all"] else None
    if any(w in ("", "!") for w in words):
        raise InputError(where, "Host", f"empty pattern in {' '.join(words)!r}")
    return tuple(words)


def _split_words(text: str) -> list[str]:
    """Words as OpenSSH's argv_split cuts them: quotes group, backslash escapes, `#` at a word start ends."""
    words: list[str] = []
    word: list[str] = []
    in_word, quote = False, ""
    chars = iter(text)
    for char in chars:
        if quote:
            if char == quote:
                quote = ""
            else:
                word.append(char)
            continue
        if char.isspace():
            if in_word:
                words.append("".join(word))
            word, in_word = [], False
            continue
        if char == "#" and not in_word:
            break
        in_word = True
        if char in "\"'":
            quote = char
        else:
            word.append(next(chars, "\\") if char == "\\" else char)
    if quote:
        raise ValueError(f"unclosed {quote} quote")
    if in_word:
        words.append("".join(word))
    return words


@functools.lru_cache(maxsize=512)
def _pattern_re(pattern: str) -> re.Pattern[str]:
    """OpenSSH's wildcard pattern: `*` and `?` only, case-insensitive."""
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.lower())
    return re.compile("".join(parts), re.DOTALL)


def _host_config(alias: str, found: Mapping[str, _Option], path: str) -> SshHostConfig:
    def value(keyword: str) -> str | None:
        option = found.get(keyword)
        return None if option is None or option.value.lower() == "none" else option.value

    hostname = value("hostname")
    if hostname is not None:
        hostname = _expand(hostname, {"h": lambda: alias})
    user, port = value("user"), _port(found.get("port"), path)
    tokens: dict[str, Callable[[], str]] = {
        "h": lambda: hostname or alias,
        "n": lambda: alias,
        "p": lambda: str(port or 22),
        "r": lambda: user or local_user(),
        "u": local_user,
        "d": lambda: os.path.expanduser("~"),
    }

    def local_path(keyword: str) -> str | None:
        written = value(keyword)
        return None if written is None else os.path.expanduser(_expand(written, tokens))

    checking = found.get("stricthostkeychecking")
    return SshHostConfig(
        alias=alias,
        hostname=hostname,
        user=user,
        port=port,
        identity_file=local_path("identityfile"),
        proxy_jump=value("proxyjump"),
        user_known_hosts_file=local_path("userknownhostsfile"),
        strict_host_key_checking=None if checking is None else checking.value.lower(),
    )


def _port(option: _Option | None, path: str) -> int | None:
    if option is None:
        return None
    if not re.fullmatch(r"[0-9]{1,5}", option.value) or not 1 <= int(option.value) <= 65535:
        raise InputError(Where(path, option.line), "Port", f"expected 1-65535 (got {option.value!r})")
    return int(option.value)


def _expand(value: str, tokens: Mapping[str, Callable[[], str]]) -> str:
    """Replace %-tokens (`%%` is a percent sign); an unknown token stays as written."""

    def one(match: re.Match[str]) -> str:
        key = match.group(1)
        if key == "%":
            return "%"
        return tokens[key]() if key in tokens else match.group(0)

    return _TOKEN.sub(one, value)
