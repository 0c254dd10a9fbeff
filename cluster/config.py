"""One configuration for every command: flag, then environment, then TOML file, then default.

The file (default `/etc/dfs/dfs.toml`, or `--config FILE`) has sections `[cluster]` (read by
every command), `[tracker]`, `[keeper]` and `[mount]`. Every key is also a flag with dashes
(`--dead-after-s 5`) and an environment variable `DFS_<KEY>` (`DFS_DEAD_AFTER_S=5`). An unknown
key in the file, or a value of the wrong type, stops the command with a message naming it.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path("/etc/dfs/dfs.toml")


class ConfigError(Exception):
    """A bad configuration; the message names the key and what was expected."""


def parse_size(value: str | int) -> int:
    """Bytes from `1048576`, `64MiB`, `8M`, `2G`, ..."""
    if isinstance(value, int):
        return value
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    scale = 1
    for suffix, factor in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
        if text.endswith(suffix):
            text, scale = text[:-1], factor
            break
    try:
        return int(float(text) * scale)
    except ValueError:
        raise ValueError(f"not a size: {value!r}") from None


@dataclass(frozen=True, slots=True)
class Key:
    name: str
    convert: Callable[[Any], Any]
    default: Any
    help: str
    sections: tuple[str, ...]


def _addr(value: Any) -> str:
    text = str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return text


def _addrs(value: Any) -> str:
    """One HOST:PORT or a comma-separated list of them (the trackers: one active, the others
    standing by); kept as the text, spaces dropped."""
    parts = [p.strip() for p in str(value).split(",") if p.strip()]
    if not parts:
        raise ValueError("expected HOST:PORT[,HOST:PORT...]")
    return ",".join(_addr(p) for p in parts)


def addr_list(value: str) -> list[str]:
    """The addresses of a `tracker` setting."""
    return [p.strip() for p in value.split(",") if p.strip()]


def _store(value: Any) -> str:
    """`sqlite`, or a PostgreSQL URI (postgresql://USER@HOST:PORT/DB, ?host=/socket/dir)."""
    text = str(value).strip()
    if text == "sqlite" or text.startswith(("postgresql://", "postgres://")):
        return text
    raise ValueError(f"expected sqlite or a postgresql:// URI, got {text!r}")


def _str(value: Any) -> str:
    return str(value)


def _float(value: Any) -> float:
    return float(value)


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected an integer")
    return int(value)


def _bool(value: Any) -> bool:
    """A TOML boolean, or true/false, yes/no, on/off, 1/0 from a flag or the environment."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


ALL = ("cluster", "tracker", "keeper", "mount", "cli")
SERVERS = ("tracker", "keeper")

KEYS: dict[str, Key] = {
    k.name: k
    for k in (
        Key(
            "tracker",
            _addrs,
            "127.0.0.1:9420",
            "the tracker's HOST:PORT, or a comma-separated list of trackers",
            ALL,
        ),
        Key("secret_file", _str, "", "the cluster secret file (mode 0600)", ALL),
        Key("tls_ca", _str, "", "CA certificate that signs the servers' certificates", ALL),
        Key("tls_cert", _str, "", "this server's TLS certificate", ("cluster", *SERVERS)),
        Key("tls_key", _str, "", "this server's TLS private key", ("cluster", *SERVERS)),
        Key("log_level", _str, "INFO", "DEBUG, INFO, WARNING or ERROR", ALL),
        Key(
            "listen",
            _addr,
            "",
            "HOST:PORT to serve on (port 0: any free port)",
            ("tracker", "keeper"),
        ),
        Key("data", _str, "", "the data directory", ("tracker", "keeper")),
        Key(
            "store",
            _store,
            "sqlite",
            "the metadata store: sqlite (in data) or a postgresql:// URI",
            ("tracker",),
        ),
        Key(
            "lease_s",
            _float,
            5.0,
            "how long the active tracker's lease lasts without renewal (PostgreSQL)",
            ("tracker",),
        ),
        Key(
            "lock_lease_s",
            _float,
            30.0,
            "how long a silent mount keeps its flock/fcntl locks",
            ("tracker",),
        ),
        Key("replication", _int, 3, "default copies per chunk", ("cluster", "tracker")),
        Key(
            "chunk_size",
            parse_size,
            8 << 20,
            "bytes per chunk for new files",
            ("cluster", "tracker"),
        ),
        Key(
            "heartbeat_s", _float, 2.0, "keeper heartbeat period", ("cluster", "tracker", "keeper")
        ),
        Key(
            "dead_after_s", _float, 30.0, "silence before a keeper is dead", ("cluster", "tracker")
        ),
        Key(
            "gc_grace_s", _float, 3600.0, "age before an uncommitted chunk is garbage", ("tracker",)
        ),
        Key("replicate_rate_mb_s", _float, 200.0, "bound on re-replication traffic", ("keeper",)),
        Key("capacity", parse_size, 0, "bytes this keeper may use (0: its disk)", ("keeper",)),
        Key("zone", _str, "", "failure domain for placement", ("keeper",)),
        Key("scrub_rate_mb_s", _float, 8.0, "background checksum scrub rate (0: off)", ("keeper",)),
        Key("http", _str, "", "HOST:PORT of the status page", ("tracker", "keeper")),
        Key("metrics", _str, "", "HOST:PORT of the Prometheus metrics", ("tracker", "keeper")),
        Key("dirty_mb", _int, 192, "bound on buffered writes", ("mount",)),
        Key("sync_on_close", _bool, False, "close() waits for fsync on every copy", ("mount",)),
        Key(
            "local_locks",
            _bool,
            False,
            "flock/fcntl locks per mount, not cluster-wide (no tracker trip per lock)",
            ("mount",),
        ),
        Key("cache_mb", _int, 192, "bound on the read cache", ("mount",)),
        Key("readahead_kb", _int, 1024, "kernel read-ahead of the mount (0: leave)", ("mount",)),
        Key(
            "transfers",
            _int,
            8,
            "chunk transfers in flight per client",
            ("cluster", "mount", "cli"),
        ),
        Key("retry_window_s", _float, 30.0, "how long to retry an unreachable tracker", ALL),
        Key("io_timeout_s", _float, 10.0, "silence before a keeper transfer fails over", ALL),
    )
}


def add_config_flags(parser: argparse.ArgumentParser, section: str) -> None:
    """Add `--config` and a flag for every key that `section` reads (defaults stay None so
    that an absent flag can be told from a given one)."""
    parser.add_argument("--config", help=f"TOML file (default {DEFAULT_CONFIG})")
    for key in KEYS.values():
        if section in key.sections:
            flag = "--" + key.name.replace("_", "-")
            if not any(flag in a.option_strings for a in parser._actions):
                parser.add_argument(flag, dest=key.name, default=None, help=key.help)


def load(
    section: str, args: argparse.Namespace, environ: dict[str, str] | None = None
) -> dict[str, Any]:
    """Every key that `section` reads: flag > DFS_<KEY> > [section] > [cluster] > default."""
    env = os.environ if environ is None else environ
    file_values = _read_file(getattr(args, "config", None), section)
    settings: dict[str, Any] = {}
    for key in KEYS.values():
        if section not in key.sections:
            continue
        flag = getattr(args, key.name, None)
        env_value = env.get("DFS_" + key.name.upper())
        if flag is not None:
            raw, origin = flag, f"--{key.name.replace('_', '-')}"
        elif env_value is not None:
            raw, origin = env_value, f"DFS_{key.name.upper()}"
        elif key.name in file_values:
            raw, origin = file_values[key.name]
        else:
            settings[key.name] = key.default
            continue
        try:
            settings[key.name] = key.convert(raw)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{origin}: bad value for {key.name!r}: {exc}") from None
    return settings


def _read_file(path: str | None, section: str) -> dict[str, tuple[Any, str]]:
    file = Path(path) if path else DEFAULT_CONFIG
    if not file.exists():
        if path:
            raise ConfigError(f"config file {file} does not exist")
        return {}
    try:
        data = tomllib.loads(file.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{file}: {exc}") from None
    values: dict[str, tuple[Any, str]] = {}
    for name, table in data.items():
        if name not in ("cluster", "tracker", "keeper", "mount"):
            raise ConfigError(f"{file}: unknown section [{name}]")
        if not isinstance(table, dict):
            raise ConfigError(f"{file}: [{name}] must be a table")
        for key in table:
            known = KEYS.get(key)
            if known is None or name not in known.sections:
                raise ConfigError(f"{file}: unknown key {key!r} in [{name}]")
    for name in ("cluster", section):
        for key, value in data.get(name, {}).items():
            if section in KEYS[key].sections:
                values[key] = (value, f"{file} [{name}]")
    return values


def parse(
    parser: argparse.ArgumentParser, section: str, argv: Sequence[str] | None = None
) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Parse argv and resolve the settings; a ConfigError exits with a one-line message."""
    add_config_flags(parser, section)
    args = parser.parse_args(argv)
    try:
        return args, load(section, args)
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: {exc}\n")
