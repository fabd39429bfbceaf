"""The config file (TOML): what `oisp record`, `oisp redirector`, `oisp sensor` and
`oisp service install` take from `--config FILE` instead of their options.

One file serves both roles of the split: each key names the command-line option it
stands for (its argparse `dest`), and a command takes the keys it has options for and
leaves the rest to the other role. docs/config.md lists every key.

Decisions are separate from I/O: `parse(text, source)` checks a file's text against
the schema (pure: unknown keys and wrong types are `ConfigError`s that name the key
and the file, never a traceback); `read(path)` opens the file, refuses it when root
would read a file others can change, and parses it.
"""

from __future__ import annotations

import difflib
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

DEFAULT_PATH = Path(r"C:\ProgramData\oisp\oisp.toml") if sys.platform == "win32" else Path("/etc/oisp/oisp.toml")
MAX_BYTES = 1 << 20  # a config file is a few hundred bytes; anything near this is not one
REDACTION = ("safe", "full", "minimal")
OTLP_PROTOCOLS = ("http/protobuf", "grpc")
UI_DEFAULT_PORT = 7878  # oisp.sinks.ui.server.DEFAULT_PORT (a test keeps them equal), not imported: 40 ms of web server


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class Key:
    """One key of the file: the option(s) it stands for, how its value is checked and
    turned into that option's value, and whether the value may be shown in errors."""
    dests: tuple[str, ...]  # the first of these that a command has takes the value
    check: Callable[[Any], Any]  # raises ValueError with what was expected; returns the option's value
    secret: bool = False  # a URL that may carry a token: never echoed
    is_list: bool = False  # an append option: the command line replaces, never extends, the file's list


# -- value checks: each returns the option's value or raises ValueError("expected …") --------
def _kind(value: Any) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value or "\n" in value or "\0" in value:
        raise ValueError("expected a non-empty one-line string")
    return value


def _path(value: Any) -> str:
    text = _string(value)
    if not os.path.isabs(text):
        raise ValueError("expected an absolute path (a service has no working directory to be relative to)")
    return text


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _integer(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"expected an integer {low}..{high}")
        return value
    return check


def _positive(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError("expected a positive number")
    return float(value)


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value
    return check


def _programs(value: Any) -> str:
    """Names or pids, as `--process a,b`: a list (or one string) becomes the comma-joined text."""
    items = [value] if isinstance(value, (str, int)) and not isinstance(value, bool) else value
    if not isinstance(items, list) or not all(isinstance(i, (str, int)) and not isinstance(i, bool) for i in items):
        raise ValueError("expected a list of program names or pids")
    names = [str(i).strip() for i in items]
    if any(not n or "," in n for n in names):
        raise ValueError("expected names or pids without commas, none empty")
    return ",".join(names)


def _plain(value: Any) -> list[str]:
    from oisp.redirect.plain import PlainSpecError, parse_plain

    if not isinstance(value, list):
        raise ValueError("expected a list of \"[HOST:]PORT[=PROVIDER]\" strings or port numbers")
    out = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise ValueError(f"expected \"[HOST:]PORT[=PROVIDER]\" strings or port numbers, not {_kind(item)}")
        try:
            parse_plain(str(item))
        except PlainSpecError as e:
            raise ValueError(str(e)) from None
        out.append(str(item))
    return out


def _not(value: Any) -> bool:
    return not _flag(value)


def _webhook(value: Any) -> str:
    text = _string(value)
    if text.startswith("@"):
        _path(text[1:])
    elif not text.startswith(("https://", "http://")):
        raise ValueError("expected an http(s) URL, or @FILE naming a file that holds one")
    return text


def _url(value: Any) -> str:
    text = _string(value)
    if not text.startswith(("https://", "http://")):
        raise ValueError("expected an http(s) URL")
    return text


# -- the schema: table -> key -> Key. A table itself (output.ui, output.otlp) is a switch. --
SCHEMA: dict[str, dict[str, Key]] = {
    "service": {
        "user": Key(("user",), _string),
        "group": Key(("group",), _string),
        "socket": Key(("socket",), _path),
    },
    "capture": {
        "process": Key(("process",), _programs),
        "exclude": Key(("exclude",), _programs),
        "spec": Key(("spec",), _path),
        "plain": Key(("plain",), _plain, is_list=True),
        "local": Key(("no_local",), _not),
        "allow_quic": Key(("allow_quic",), _flag),
        "proxy_port": Key(("proxy_port",), _integer(1, 65535)),
        "flow_idle_timeout": Key(("flow_idle_timeout",), _positive),
    },
    "events": {
        "redaction": Key(("redaction",), _one_of(REDACTION)),
        "prices": Key(("prices",), _path),
        "streaming_chunks": Key(("streaming_chunks",), _flag),
    },
    "output": {
        "jsonl": Key(("output", "jsonl"), _path),  # record's and the sensor's -o, replay's --jsonl
        "jsonl_max_mb": Key(("jsonl_max_mb",), _positive),
        "stdout": Key(("stdout",), _flag),
        "pretty": Key(("pretty",), _flag),
        "webhook": Key(("webhook",), _webhook, secret=True),
    },
    "output.ui": {
        "port": Key(("ui",), _integer(0, 65535)),
        "host": Key(("ui_host",), _string),
    },
    "output.otlp": {
        "url": Key(("otlp",), _url, secret=True),
        "protocol": Key(("otlp_protocol",), _one_of(OTLP_PROTOCOLS)),
        "content": Key(("otlp_content",), _flag),
    },
}
# A switch table turns its option on when present: (option, the table's key that sets the
# option's value, the value when that key is absent).
SWITCHES = {"output.ui": ("ui", "port", UI_DEFAULT_PORT), "output.otlp": ("otlp", "url", "")}


@dataclass(frozen=True)
class Config:
    """A checked file: `values` maps "table.key" to the option's value."""
    path: Path
    values: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)

    def options(self, dests: set[str]) -> tuple[dict[str, Any], dict[str, list]]:
        """The values a command with these option dests takes: (scalars, lists) by dest."""
        scalars: dict[str, Any] = {}
        lists: dict[str, list] = {}
        for name, value in self.values.items():
            if name in SWITCHES:
                if SWITCHES[name][0] in dests:
                    scalars[SWITCHES[name][0]] = value
                continue
            table, _, key = name.rpartition(".")
            spec = SCHEMA[table][key]
            dest = next((d for d in spec.dests if d in dests), None)
            if dest is not None:
                (lists if spec.is_list else scalars)[dest] = value
        return scalars, lists


def parse(text: str, source: str | os.PathLike[str]) -> Config:
    """Check a config file's text; `source` names it in errors."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    values: dict[str, Any] = {}
    _walk(document, "", source, values)
    for name, (_, key, default) in SWITCHES.items():
        if name in values:  # the table was there: its option is on
            values[name] = values.get(f"{name}.{key}", default)
    return Config(Path(source), values)


def _walk(table: dict, prefix: str, source, values: dict[str, Any]) -> None:
    known = SCHEMA.get(prefix, {}) if prefix else {}
    subtables = {name.rpartition(".")[2] for name in SCHEMA if name.rpartition(".")[0] == prefix}
    if prefix in SWITCHES:
        values[prefix] = None  # present; parse() fills in the switch's value
    for key, value in table.items():
        name = f"{prefix}.{key}" if prefix else key
        if key in subtables:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{name}] must be a table, not {_kind(value)}")
            _walk(value, name, source, values)
        elif key in known:
            spec = known[key]
            try:
                values[name] = spec.check(value)
            except ValueError as e:
                plain_value = isinstance(value, (str, int, float, bool)) and not spec.secret
                shown = f" (got {value!r})" if plain_value else f" (got {_kind(value)})"
                raise ConfigError(f"{source}: {name}: {e}{shown}") from None
        else:
            raise ConfigError(f"{source}: unknown key {name}{_suggest(key, set(known) | subtables, prefix)}")


def _suggest(key: str, known: set[str], prefix: str) -> str:
    where = f"[{prefix}]" if prefix else "the top level"
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"{hint} ({where} takes: {', '.join(sorted(known))}; see docs/config.md)"


# -- I/O -----------------------------------------------------------------------------------
def read(path: str | os.PathLike[str]) -> Config:
    """Read and check the file at `path`. As root (POSIX), a file or directory on its way
    that someone else could change is refused: it would decide what root runs and where
    root writes."""
    path = Path(os.path.abspath(path))
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (docs/config.md shows one to start from)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot open: {e.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path}: not a regular file")
        if sys.platform != "win32" and os.geteuid() == 0:
            problem = unsafe_for_root(path, info)
            if problem:
                raise ConfigError(problem)
        data = os.read(fd, MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_BYTES} bytes: not a config file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return parse(text, path)


def unsafe_for_root(path: Path, info: os.stat_result) -> str | None:
    """Why root must not trust the file `info` describes, or None. It and every directory
    above it (as named and once links are resolved) must belong to root and be writable
    by nobody else; a sticky directory (/tmp) lets nobody replace root's file in it."""
    if info.st_uid != 0:
        return f"{path}: owned by uid {info.st_uid}, and root reads it: run  chown root: {path}"
    if info.st_mode & 0o022:
        who = {0o022: "group and others", 0o020: "group", 0o002: "others"}[info.st_mode & 0o022]
        return f"{path}: writable by {who}, and root reads it (it decides what root runs): run  chmod go-w {path}"
    for directory in _directories(path):
        try:
            d = os.stat(directory)
        except OSError as e:
            return f"{directory}: cannot check: {e.strerror}"
        if d.st_uid != 0:
            return f"{directory} (holding {path}) belongs to uid {d.st_uid}, who could swap the file: move it to /etc/oisp"
        if d.st_mode & 0o022 and not d.st_mode & stat.S_ISVTX:
            return f"{directory} (holding {path}) is writable by others, who could swap the file: run  chmod go-w {directory}"
    return None


def _directories(path: Path) -> list[Path]:
    seen: list[Path] = []
    for p in (path, Path(os.path.realpath(path))):
        for parent in p.parents:
            if parent not in seen:
                seen.append(parent)
    return seen
