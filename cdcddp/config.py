"""The server's whole configuration: one pydantic model, four sources, one-sentence errors.

Sources, lowest to highest precedence::

    defaults  <  TOML file (--config PATH)  <  environment CDCDDP_<KEY>  <  command-line flags

Nested keys: ``[heartbeat] interval = 20`` in TOML, ``CDCDDP_HEARTBEAT__INTERVAL=20`` in the
environment, ``--heartbeat-interval 20`` on the command line. Durations are seconds or a number
with a unit (``250ms``, ``30s``, ``5min``, ``1h``); sizes are bytes or a number with a
PostgreSQL-style unit (``kB``, ``MB``, ``GB``, 1024-based).

    config = load_config("cdcddp.toml", os.environ, {"listen": "0.0.0.0:3000"})
    print(render_config(config))          # effective config as TOML, secrets masked

Anything wrong raises :class:`ConfigError` whose message is one sentence naming the key, the
problem and where the value came from, e.g.
``listen: expected HOST:PORT, got 'abc' (from CDCDDP_LISTEN).``
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)

from cdcddp.ddp.session import SessionConfig
from cdcddp.logs import MASK, SECRET_KEY, mask_dsn
from cdcddp.metrics import DEFAULT_METRICS_HOST, DEFAULT_METRICS_PORT
from cdcddp.server.config import ServerConfig

ENV_PREFIX = "CDCDDP_"
ENV_NESTING = "__"
DEFAULT_LISTEN = "127.0.0.1:3000"
DEFAULT_METRICS_LISTEN = f"{DEFAULT_METRICS_HOST}:{DEFAULT_METRICS_PORT}"

_SESSION_DEFAULTS = SessionConfig()
_SERVER_DEFAULTS = ServerConfig()


class ConfigError(Exception):
    """A configuration value is missing or wrong; ``str()`` is one sentence saying which."""


# -- value types ---------------------------------------------------------------------------------


class HostPort(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_HOST_PORT = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]+)):(?P<port>\d{1,5})$")


def parse_host_port(value: Any) -> HostPort:
    if isinstance(value, HostPort):
        return value
    text = str(value).strip()
    match = _HOST_PORT.match(text)
    if match is None or int(match["port"]) > 65535:
        raise ValueError(f"expected HOST:PORT (like 127.0.0.1:3000 or [::]:3000), got {text!r}")
    return HostPort(match["v6"] or match["host"], int(match["port"]))


def _optional_host_port(value: Any) -> HostPort | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "off", "none")):
        return None
    return parse_host_port(value)


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "sec": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3, "tb": 1024**4}
_NUMBER_UNIT = re.compile(r"^\s*(?P<number>[0-9]+(?:\.[0-9]*)?)\s*(?P<unit>[A-Za-z]*)\s*$")


def parse_duration(value: Any) -> float:
    """Seconds from a number or ``<number><unit>`` (ms, s, min, h, d)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _NUMBER_UNIT.match(str(value))
        unit = (match["unit"] or "s").lower() if match else ""
        if match is None or unit not in _DURATION_UNITS:
            raise ValueError(f"expected seconds or a duration like 30s, 250ms, 5min, got "
                             f"{value!r}")
        seconds = float(match["number"]) * _DURATION_UNITS[unit]
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"expected a duration of 0 or more seconds, got {value!r}")
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from an integer or ``<number><unit>`` (B, kB, MB, GB, TB; 1024-based like
    PostgreSQL)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _NUMBER_UNIT.match(str(value))
        unit = (match["unit"] or "b").lower() if match else ""
        if match is None or unit not in _SIZE_UNITS:
            raise ValueError(f"expected bytes or a size like 512kB, 64MB, 1GB, got {value!r}")
        size = int(float(match["number"]) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"expected a size above 0 bytes, got {value!r}")
    return size


def _bool_text(value: Any) -> Any:
    # pydantic's lax bool parsing accepts these too; spelled out so TOML strings work the same.
    if isinstance(value, str) and value.strip().lower() in ("on", "yes", "true", "1"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("off", "no", "false", "0"):
        return False
    return value


def _optional_size(value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "off", "none")):
        return None
    return parse_size(value)


Seconds = Annotated[float, BeforeValidator(parse_duration)]
Bytes = Annotated[int, BeforeValidator(parse_size)]
OptionalBytes = Annotated[int | None, BeforeValidator(_optional_size)]
Flag = Annotated[bool, BeforeValidator(_bool_text)]
ListenAddress = Annotated[HostPort, BeforeValidator(parse_host_port)]
OptionalListenAddress = Annotated[HostPort | None, BeforeValidator(_optional_host_port)]

_SLOT_NAME = re.compile(r"^[a-z0-9_]{1,63}$")
_APP_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


# -- the model -----------------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


class Heartbeat(_Section):
    interval: Seconds = Field(
        _SESSION_DEFAULTS.heartbeat_interval,
        description="ping a client after this much silence (0: never)")
    timeout: Seconds = Field(
        _SESSION_DEFAULTS.heartbeat_timeout,
        description="close a client that stays silent this long after our ping")


class Limits(_Section):
    max_message_bytes: Bytes = Field(
        _SESSION_DEFAULTS.max_message_bytes,
        description="largest DDP message accepted from a client (larger: DDP error)")
    max_subscriptions: int = Field(
        _SESSION_DEFAULTS.max_subscriptions, gt=0, description="live subscriptions per client")
    max_pending_methods: int = Field(
        _SESSION_DEFAULTS.max_pending_methods, gt=0,
        description="method calls per client not yet answered")
    max_send_buffer_bytes: Bytes = Field(
        _SERVER_DEFAULTS.max_send_buffer_bytes,
        description="unsent bytes for one client before it is disconnected as slow_client")


class Config(_Section):
    dsn: SecretStr = Field(description="libpq connection string or postgresql:// URI")
    primary_dsn: SecretStr | None = Field(
        None, description="when dsn is a standby (PostgreSQL 16+, which then only decodes): "
        "its primary, where every query goes (not set: dsn)")
    app: str = Field(description="the application to serve, as module:attribute")
    slot: str = Field("cdcddp", description="logical replication slot name")
    temporary_slot: Flag = Field(
        False, description="use a temporary slot (dropped when cdcddp stops; resync on start)")
    failover_slot: Flag = Field(
        False, description="make the slot a failover slot (PostgreSQL 17+), which standbys "
        "with sync_replication_slots copy: after a failover to one, the node resumes there "
        "without a resync")
    listen: ListenAddress = Field(DEFAULT_LISTEN, description="DDP/HTTP address, HOST:PORT")
    metrics_listen: OptionalListenAddress = Field(
        DEFAULT_METRICS_LISTEN, description="Prometheus /metrics address, HOST:PORT or off")
    heartbeat: Heartbeat = Field(default_factory=Heartbeat)
    limits: Limits = Field(default_factory=Limits)
    readiness_max_lag_bytes: Bytes = Field(
        64 * 1024**2, description="/readyz: not ready while the slot lags more than this "
        "(as last polled)")
    readiness_max_lag_seconds: Seconds = Field(
        30.0, description="/readyz: not ready while the applied position is further behind "
        "its commits than this")
    slot_poll_interval: Seconds = Field(
        10.0, description="how often the slot's lag and retained WAL are queried")
    resync_behind_bytes: OptionalBytes = Field(
        None, description="when the applied position falls this far behind the database's "
        "WAL, skip the backlog and resync every subscription (off: always work through it)")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="debug, info, warning or error")
    log_json: Flag = Field(False, description="log JSON lines instead of text")
    static_dir: Path | None = Field(
        None, description="serve files from this directory (not set: the built-in Todos page)")

    @field_validator("dsn", "primary_dsn", mode="before")
    @classmethod
    def _check_dsn(cls, value: Any) -> Any:
        from psycopg.conninfo import conninfo_to_dict

        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if text is None:
            return None  # (only primary_dsn may be unset: dsn is required)
        if not isinstance(text, str) or not text.strip():
            raise ValueError("expected a libpq connection string (host=... dbname=...) or a "
                             "postgresql:// URI")
        try:
            conninfo_to_dict(text)
        except Exception:
            # The parser's message quotes the string it choked on, which may be the password.
            raise ValueError("not a valid libpq connection string (key=value pairs) or "
                             "postgresql:// URI") from None
        return text

    @field_validator("slot", mode="before")
    @classmethod
    def _check_slot(cls, value: Any) -> Any:
        if not isinstance(value, str) or not _SLOT_NAME.match(value):
            raise ValueError("expected 1 to 63 lower-case letters, digits or underscores "
                             f"(PostgreSQL's rule for slot names), got {value!r}")
        return value

    @field_validator("app", mode="before")
    @classmethod
    def _check_app(cls, value: Any) -> Any:
        if not isinstance(value, str) or not _APP_SPEC.match(value.strip()):
            raise ValueError(f"expected module:attribute (like cdcddp.examples.todos:app), "
                             f"got {value!r}")
        return value.strip()

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("static_dir", mode="before")
    @classmethod
    def _check_static_dir(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        path = Path(str(value)).expanduser()
        if not path.is_dir():
            raise ValueError(f"expected an existing directory, got {str(value)!r}")
        return path

    # -- for the rest of the server ----------------------------------------------------------
    @property
    def dsn_value(self) -> str:
        """The DSN itself (with its password): pass it to psycopg, never to a log."""
        return self.dsn.get_secret_value()

    @property
    def primary_dsn_value(self) -> str | None:
        """The primary's DSN when set apart from ``dsn`` (with its password)."""
        return None if self.primary_dsn is None else self.primary_dsn.get_secret_value()

    def session_config(self) -> SessionConfig:
        return SessionConfig(
            heartbeat_interval=self.heartbeat.interval, heartbeat_timeout=self.heartbeat.timeout,
            max_message_bytes=self.limits.max_message_bytes,
            max_subscriptions=self.limits.max_subscriptions,
            max_pending_methods=self.limits.max_pending_methods)

    def server_config(self) -> ServerConfig:
        """The server's limits (static files are wired by the caller: ``server.static``)."""
        return ServerConfig(session=self.session_config(),
                            max_send_buffer_bytes=self.limits.max_send_buffer_bytes,
                            readiness_max_lag_seconds=self.readiness_max_lag_seconds,
                            readiness_max_lag_bytes=self.readiness_max_lag_bytes)


# -- loading -------------------------------------------------------------------------------------

KeyPath = tuple[str, ...]


def _sections() -> dict[str, type[BaseModel]]:
    out: dict[str, type[BaseModel]] = {}
    for name, info in Config.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out[name] = annotation
    return out


def leaf_keys() -> list[KeyPath]:
    """Every settable key, as paths (``("heartbeat", "interval")``)."""
    sections = _sections()
    keys: list[KeyPath] = []
    for name in Config.model_fields:
        if name in sections:
            keys.extend((name, sub) for sub in sections[name].model_fields)
        else:
            keys.append((name,))
    return keys


def env_name(path: KeyPath) -> str:
    return ENV_PREFIX + ENV_NESTING.join(path).upper()


def flag_name(path: KeyPath) -> str:
    return "--" + "-".join(path).replace("_", "-")


def _dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


class _Layers:
    """The merged raw values and, for each key, where its value came from."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.origin: dict[KeyPath, str] = {}

    def set(self, path: KeyPath, value: Any, origin: str) -> None:
        target = self.values
        for part in path[:-1]:
            existing = target.get(part)
            if not isinstance(existing, dict):
                existing = target[part] = {}
            target = existing
        target[path[-1]] = value
        self.origin[path] = origin

    def merge_table(self, table: Mapping[str, Any], origin: str, prefix: KeyPath = ()) -> None:
        sections = _sections()
        for key, value in table.items():
            path = (*prefix, key)
            if not prefix and key in sections and isinstance(value, dict):
                self.merge_table(value, origin, path)
            else:
                self.set(path, value, origin)

    def origin_of(self, path: KeyPath) -> str | None:
        while path:
            if path in self.origin:
                return self.origin[path]
            path = path[:-1]
        return None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found; check --config.") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path}: is a directory, not a TOML file.") from None
    except PermissionError:
        raise ConfigError(f"config file {path}: not readable by this user.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML ({exc}).") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text.") from None


def _env_layer(layers: _Layers, env: Mapping[str, str]) -> None:
    sections = _sections()
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        value = env[name]
        if value == "":
            continue  # VAR= in a unit file or compose means "not set"
        parts = tuple(name[len(ENV_PREFIX):].lower().split(ENV_NESTING))
        head = parts[0]
        if head not in Config.model_fields:
            if len(parts) > 1:  # shaped like a nested config key: surely meant as one
                raise ConfigError(f"{_dotted(parts)}: unknown key (from {name}); known sections: "
                                  f"{', '.join(sections)}.")
            continue  # other CDCDDP_* variables (CDCDDP_PG_BINDIR, ...) are not config
        if head in sections and len(parts) == 1:
            raise ConfigError(f"{head}: is a section, set one of its keys as "
                              f"{name}{ENV_NESTING}<KEY> (from {name}).")
        if head not in sections and len(parts) > 1:
            raise ConfigError(f"{_dotted(parts)}: unknown key, {head} has no sub-keys "
                              f"(from {name}).")
        if len(parts) > 2:
            raise ConfigError(f"{_dotted(parts)}: unknown key, sections nest one level "
                              f"(from {name}).")
        layers.set(parts, value, name)


_TYPE_PHRASES = {
    "int_parsing": "expected an integer", "int_type": "expected an integer",
    "int_from_float": "expected an integer", "float_parsing": "expected a number",
    "float_type": "expected a number", "bool_parsing": "expected true or false",
    "bool_type": "expected true or false", "string_type": "expected a string",
    "path_type": "expected a path",
}


def _known_keys(path: KeyPath) -> list[str]:
    sections = _sections()
    if len(path) > 1 and path[0] in sections:
        return list(sections[path[0]].model_fields)
    return list(Config.model_fields)


def _describe(error: Mapping[str, Any], layers: _Layers) -> str:
    path = tuple(str(p) for p in error["loc"])
    key = _dotted(path) or "config"
    origin = layers.origin_of(path)
    source = f" (from {origin})" if origin else ""
    kind = error["type"]
    if kind == "missing":
        leaf = path if path in leaf_keys() else path[:1]
        return (f"{key}: required, set it in the config file, as {env_name(leaf)} or with "
                f"{flag_name(leaf)}.")
    if kind == "extra_forbidden":
        known = _known_keys(path)
        close = difflib.get_close_matches(path[-1], known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{key}: unknown key{source}; {hint}known keys: {', '.join(known)}."
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{key}: expected a table of keys ([{key}] in TOML){source}."
    secret = path[0] in ("dsn", "primary_dsn") or bool(SECRET_KEY.search(key))
    got = "" if secret or "input" not in error else f", got {error['input']!r}"
    if kind == "value_error":
        message = str(error["msg"]).removeprefix("Value error, ")
        if secret:
            message = mask_dsn(message)
        return f"{key}: {message}{source}."
    phrase = _TYPE_PHRASES.get(kind)
    if phrase is None:
        phrase = str(error["msg"]).replace("Input should be", "expected a value", 1)
        if kind == "literal_error":
            phrase = str(error["msg"]).replace("Input should be", "expected", 1)
    return f"{key}: {phrase}{got}{source}."


def load_config(toml_path: str | Path | None = None, env: Mapping[str, str] | None = None,
                cli_overrides: Mapping[str, Any] | None = None) -> Config:
    """The effective configuration: defaults < TOML file < ``CDCDDP_*`` env < CLI overrides.

    ``cli_overrides`` keys are config keys (``"listen"``, ``"heartbeat.interval"`` or
    ``"heartbeat__interval"``); ``None`` values mean "flag not given" and are skipped.
    """
    layers = _Layers()
    if toml_path is not None:
        path = Path(toml_path)
        layers.merge_table(_read_toml(path), str(path))
    _env_layer(layers, env or {})
    for raw_key, value in (cli_overrides or {}).items():
        if value is None:
            continue
        parts = tuple(raw_key.replace(ENV_NESTING, ".").split("."))
        layers.set(parts, value, flag_name(parts))
    try:
        return Config.model_validate(layers.values)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        message = _describe(errors[0], layers)
        if len(errors) > 1:
            message = message[:-1] + f" (and {len(errors) - 1} more problem" \
                f"{'s' if len(errors) > 2 else ''})."
        raise ConfigError(message) from None


# -- rendering -----------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)  # a valid TOML basic string


def _plain(key: str, value: Any) -> Any:
    if isinstance(value, SecretStr):
        return mask_dsn(value.get_secret_value())
    if value is not None and SECRET_KEY.search(key):
        return MASK
    if isinstance(value, HostPort | Path):
        return str(value)
    return value


def render_config(config: Config) -> str:
    """The effective configuration as TOML, secrets masked (the DSN keeps all but its
    password). Unset optional keys are shown as comments."""
    top: list[str] = []
    tables: list[str] = []
    for name in Config.model_fields:
        value = getattr(config, name)
        if isinstance(value, BaseModel):
            tables.append(f"\n[{name}]")
            for sub in type(value).model_fields:
                tables.append(f"{sub} = {_toml_value(_plain(sub, getattr(value, sub)))}")
            continue
        plain = _plain(name, value)
        if name in ("metrics_listen", "resync_behind_bytes") and plain is None:
            top.append(f"{name} = \"off\"")
        elif plain is None:
            top.append(f"# {name} = (not set)")
        else:
            top.append(f"{name} = {_toml_value(plain)}")
    return "\n".join(top + tables) + "\n"


# -- reference -----------------------------------------------------------------------------------


def _leaf_field(path: KeyPath) -> Any:
    owner = _sections()[path[0]] if len(path) > 1 else Config
    return owner.model_fields[path[-1]]


def _validators(info: Any) -> set[Any]:
    return {m.func for m in info.metadata if isinstance(m, BeforeValidator)}


def _human_seconds(seconds: float) -> str:
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


def _human_bytes(size: int) -> str:
    for unit, factor in (("GB", 1024**3), ("MB", 1024**2), ("kB", 1024)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


# Values whose rule lives in a field validator rather than in the type.
_VALUE_KINDS = {("dsn",): "libpq string or URI", ("primary_dsn",): "libpq string or URI",
                ("app",): "module:attribute",
                ("slot",): "a-z 0-9 _ (1-63)"}


def _value_kind(path: KeyPath, info: Any) -> str:
    if path in _VALUE_KINDS:
        return _VALUE_KINDS[path]
    validators = _validators(info)
    if parse_duration in validators:
        return "duration"
    if parse_size in validators:
        return "size"
    if _optional_host_port in validators:
        return "HOST:PORT or off"
    if _optional_size in validators:
        return "size or off"
    if parse_host_port in validators:
        return "HOST:PORT"
    if info.annotation is bool:
        return "true/false"
    if info.annotation is int:
        return "integer > 0" if any(getattr(m, "gt", None) == 0 for m in info.metadata) \
            else "integer"
    choices = getattr(info.annotation, "__args__", ())
    if choices and all(isinstance(c, str) for c in choices):
        return " / ".join(choices)
    if info.annotation == Path | None:
        return "directory"
    return "text"


def _default_text(path: KeyPath, info: Any) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    validators = _validators(info)
    if value is None:
        return "off" if _optional_size in validators else "not set"
    if parse_duration in validators:
        return _human_seconds(value)
    if parse_size in validators:
        return _human_bytes(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def config_reference() -> str:
    """Every configuration key as a Markdown table (key, environment variable, flag,
    value, default, meaning), generated from the model: ``cdcddp config reference`` prints it
    and ``docs/configuration.md`` embeds it (a test keeps the two equal)."""
    lines = ["| Key | Environment | Flag | Value | Default | Meaning |",
             "|---|---|---|---|---|---|"]
    for path in leaf_keys():
        info = _leaf_field(path)
        flag = "positional `APP`" if path == ("app",) else f"`{flag_name(path)}`"
        if info.annotation is bool:
            flag = f"`{flag_name(path)}` / `--no-{flag_name(path)[2:]}`"
        meaning = (info.description or "").replace("|", "\\|")
        kind, default = _value_kind(path, info), _default_text(path, info)
        lines.append(f"| `{_dotted(path)}` | `{env_name(path)}` | {flag} | {kind} "
                     f"| `{default}` | {meaning} |")
    return "\n".join(lines) + "\n"


# -- command line ------------------------------------------------------------------------------


def _dest(path: KeyPath) -> str:
    return "config__" + "__".join(path)


def add_config_arguments(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    """Add ``--config PATH`` and one flag per config key (``--listen``, ``--heartbeat-interval``,
    ...; booleans as ``--log-json/--no-log-json``). Every flag defaults to "not given", so
    the file and environment still apply. ``skip``: keys the caller takes otherwise (``app``
    as a positional argument)."""
    parser.add_argument("--config", metavar="PATH", default=None,
                        help=f"TOML configuration file (keys as below; also {ENV_PREFIX}<KEY>)")
    sections = _sections()
    for path in leaf_keys():
        if _dotted(path) in skip:
            continue
        owner = sections[path[0]] if len(path) > 1 else Config
        info = owner.model_fields[path[-1]]
        help_text = info.description or ""
        if info.annotation is bool:
            parser.add_argument(flag_name(path), dest=_dest(path), default=None,
                                action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag_name(path), dest=_dest(path), default=None,
                                metavar=path[-1].upper(), help=help_text)


def cli_overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given on the command line, keyed for :func:`load_config`."""
    out: dict[str, Any] = {}
    for path in leaf_keys():
        value = getattr(args, _dest(path), None)
        if value is not None:
            out[_dotted(path)] = value
    return out
