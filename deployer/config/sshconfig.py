"""Read an OpenSSH client config (`~/.ssh/config`) for the few things deployer takes from it, through
Paramiko's `SSHConfig`: `Host` and `Match` blocks (host, originalhost, user, localuser, all, canonical,
final), negated patterns, first value wins, its %-tokens.

Around it, what Paramiko does not do:
- every line is checked first (quotes, missing values), so a broken line is a `path:line` error, not a guess;
- `Match exec` is refused with its line: it would run a command while merely reading an inventory;
- `Include` is followed (globs, relative to ~/.ssh, at most 16 deep, each file a regular file of at most
  1 MiB): the included lines take the place of the `Include` line, and the block it sat in goes on after;
- names are matched lower-cased, as OpenSSH lower-cases the host it is given;
- `%n` in IdentityFile and the tokens of UserKnownHostsFile are expanded (`%%`, `%h`, `%n`, `%p`, `%r`,
  `%u`, `%d`); a Port that is not 1-65535 is an error naming its line when a host uses it.
"""

from __future__ import annotations

import getpass
import glob
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deployer.config.files import MAX_SSH_CONFIG, read_user_file
from deployer.errors import InputError, Where

if TYPE_CHECKING:
    import paramiko.config


def _paramiko_config() -> Any:
    """paramiko.config, imported when a config file is read: Paramiko with its cryptography costs ~50 ms of
    every start, and a run whose devices go through the connection master never needs it otherwise.
    paramiko.config imports invoke (~35 ms more) only to run `Match exec`, which deployer refuses before
    Paramiko sees the config: invoke is kept out of that import (connect/ssh.py does the same)."""
    kept_out = "invoke" not in sys.modules
    if kept_out:
        sys.modules["invoke"] = None  # type: ignore[assignment]
    try:
        import paramiko.config
    finally:
        if kept_out:
            del sys.modules["invoke"]  # anyone importing invoke later gets the real one
    return paramiko.config


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


MAX_INCLUDE_DEPTH = 16
_DEFAULT_DIR = "~/.ssh"


@dataclass(frozen=True, slots=True)
class SshConfig:
    """A parsed ssh config; `path` names it in messages (an empty config when the file does not exist)."""

    path: str
    config: paramiko.config.SSHConfig | None = None
    ports: tuple[tuple[str, int, str], ...] = ()  # (value, line, file) of each Port, for messages
    hosts: tuple[str, ...] = ()  # every pattern of every Host line, in file order

    def literal_hosts(self) -> list[str]:
        """The names `Host` lines list without wildcards or negation, in file order."""
        return [n for n in self.hosts if not any(c in n for c in "*?!")]

    def resolve(self, alias: str) -> SshHostConfig:
        """What applies to `alias`, first value winning for each keyword, as OpenSSH does."""
        if self.config is None:
            return SshHostConfig(alias)
        name = alias.lower()
        try:
            found = self.config.lookup(name)
        except _paramiko_config().ConfigParseError as exc:  # kept as a net: the lines were checked already
            raise InputError(Where(self.path), None, str(exc)) from None
        return _host_config(alias, name, found, self)


def parse_ssh_config(text: str, path: str = "<ssh_config>") -> SshConfig:
    """Parse the text of an ssh config; raises `InputError` (path:line) for a line it cannot read, a
    `Match exec`, or an `Include` that cannot be read."""
    lines, ports = _expand(text, path, 0)
    try:
        config = _paramiko_config().SSHConfig.from_text("\n".join(lines))
    except _paramiko_config().ConfigParseError as exc:  # every line was checked above: kept as a net
        raise InputError(Where(path), None, f"cannot read this ssh config: {exc}") from None
    hosts: dict[str, None] = {}
    for line in lines:
        parsed = _parse_line(line, Where(path))
        if parsed is not None and parsed[0] == "host":
            hosts.update(dict.fromkeys(parsed[1]))
    return SshConfig(path, config, tuple(ports), tuple(hosts))


def load_ssh_config(path: str | os.PathLike[str] | None = None) -> SshConfig:
    """Read `path` (default `~/.ssh/config`); a file that does not exist is an empty config."""
    file = os.path.expanduser(os.fspath(path if path is not None else DEFAULT_PATH))
    data = read_user_file(file, MAX_SSH_CONFIG, "ssh config")
    if data is None:
        return SshConfig(file)
    return parse_ssh_config(data.decode("utf-8", errors="replace"), file)


def _expand(text: str, path: str, depth: int) -> tuple[list[str], list[tuple[str, int, str]]]:
    """The config's lines, checked, with each `Include` replaced by the lines it names."""
    lines: list[str] = []
    ports: list[tuple[str, int, str]] = []
    header: str | None = None  # the Host/Match line of the block being read
    for number, raw in enumerate(text.splitlines(), start=1):
        where = Where(path, number)
        parsed = _parse_line(raw, where)
        if parsed is None:
            continue
        keyword, words = parsed
        if keyword == "match" and any(w.lower() == "exec" for w in words):
            raise InputError(where, "Match", "'Match exec' would run a command just to read the config: "
                                             "deployer refuses it (use Host blocks, or point ssh_config at a file "
                                             "without it)")
        if keyword == "host" and any(w in ("", "!") for w in words):
            raise InputError(where, "Host", f"empty pattern in {' '.join(words)!r}")
        if keyword == "match":
            try:  # Paramiko's checks of the criteria, on this line alone so that the error names it
                _paramiko_config().SSHConfig.from_text(raw.strip())
            except _paramiko_config().ConfigParseError as exc:
                raise InputError(where, "Match", str(exc)) from None
        if keyword in ("host", "match"):
            header = raw.strip()
        if keyword == "include":
            for file in _included(words, where):
                more, more_ports = _read_included(file, where, depth)
                lines += more
                ports += more_ports
            if header is not None:
                lines.append(header)  # the block the Include sat in goes on
            continue
        if keyword == "port":
            ports.append((words[0], number, path))
        lines.append(raw)
    return lines, ports


def _included(words: list[str], where: Where) -> list[str]:
    files: list[str] = []
    for word in words:
        pattern = os.path.expanduser(word)
        if not os.path.isabs(pattern):
            pattern = os.path.join(os.path.expanduser(_DEFAULT_DIR), pattern)
        files += sorted(glob.glob(pattern))  # no match: nothing, as OpenSSH
    return files


def _read_included(file: str, where: Where, depth: int) -> tuple[list[str], list[tuple[str, int, str]]]:
    if depth >= MAX_INCLUDE_DEPTH:
        raise InputError(where, "Include", f"includes nested over {MAX_INCLUDE_DEPTH} deep (a loop?)")
    try:
        data = read_user_file(file, MAX_SSH_CONFIG, "included ssh config")
    except InputError as exc:
        raise InputError(where, "Include", exc.problem + f" ({file})") from None
    if data is None:
        return [], []
    return _expand(data.decode("utf-8", errors="replace"), file, depth + 1)


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
    if (not words or not words[0]) and (keyword in _WANTED or keyword in ("host", "match", "include")):
        raise InputError(where, match.group(1), "missing value")
    return keyword, words


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


def _host_config(alias: str, name: str, found: paramiko.config.SSHConfigDict, config: SshConfig) -> SshHostConfig:
    def value(keyword: str) -> str | None:
        got = found.get(keyword)
        text = got[0] if isinstance(got, list) else got
        return None if text is None or str(text).lower() == "none" else str(text)

    hostname = value("hostname")
    if hostname == name:
        hostname = None  # Paramiko fills in the name looked up; OpenSSH would connect to it all the same
    user, port = value("user"), _port(value("port"), config)
    tokens: dict[str, Callable[[], str]] = {
        "h": lambda: hostname or alias,
        "n": lambda: name,
        "p": lambda: str(port or 22),
        "r": lambda: user or local_user(),
        "u": local_user,
        "d": lambda: os.path.expanduser("~"),
    }

    def local_path(keyword: str, only: str | None = None) -> str | None:
        written = value(keyword)
        if written is None or not written.split():
            return None
        first = written.split()[0] if keyword == "userknownhostsfile" else written
        return os.path.expanduser(_expand_tokens(first, tokens, only))

    checking = value("stricthostkeychecking")
    return SshHostConfig(
        alias=alias,
        hostname=hostname,
        user=user,
        port=port,
        identity_file=local_path("identityfile", only="n"),  # Paramiko expanded the others
        proxy_jump=value("proxyjump"),
        user_known_hosts_file=local_path("userknownhostsfile"),
        strict_host_key_checking=None if checking is None else checking.lower(),
    )


def _port(text: str | None, config: SshConfig) -> int | None:
    if text is None:
        return None
    if not re.fullmatch(r"[0-9]{1,5}", text) or not 1 <= int(text) <= 65535:
        line, file = next(((n, f) for v, n, f in config.ports if v == text), (0, config.path))
        raise InputError(Where(file, line), "Port", f"expected 1-65535 (got {text!r})")
    return int(text)


def _expand_tokens(value: str, tokens: Mapping[str, Callable[[], str]], only: str | None = None) -> str:
    """Replace %-tokens (`%%` is a percent sign); an unknown token stays as written. `only`: just that one."""

    def one(match: re.Match[str]) -> str:
        key = match.group(1)
        if only is not None and key != only:
            return match.group(0)
        if key == "%":
            return "%"
        return tokens[key]() if key in tokens else match.group(0)

    return _TOKEN.sub(one, value)
