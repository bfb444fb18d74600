"""cdcddp.config (sources, precedence, one-sentence errors, masking) and cdcddp.logs."""

from __future__ import annotations

import argparse
import io
import json
import logging
import tomllib
from pathlib import Path
from typing import Any

import pytest

from cdcddp.config import (
    Config,
    ConfigError,
    HostPort,
    add_config_arguments,
    cli_overrides_from_args,
    env_name,
    leaf_keys,
    load_config,
    render_config,
)
from cdcddp.logs import mask_secrets, setup_logging

SECRET = "s3cr3t-Pa55"
BASE_ENV = {"CDCDDP_DSN": f"postgresql://app:{SECRET}@db.example:5432/todos",
            "CDCDDP_APP": "cdcddp.examples.todos:app"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cdcddp.toml"
    path.write_text(text)
    return path


def error_of(toml: Path | None = None, env: dict[str, str] | None = None,
             cli: dict[str, Any] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(toml, env, cli)
    message = str(info.value)
    # One sentence: one line, one final full stop, no traceback text.
    assert "\n" not in message and message.endswith(".") and "Traceback" not in message
    return message


# -- sources and precedence ----------------------------------------------------------------------


def test_defaults() -> None:
    config = load_config(None, BASE_ENV)
    assert config.listen == HostPort("127.0.0.1", 3000)
    assert config.metrics_listen == HostPort("127.0.0.1", 9108)
    assert config.slot == "cdcddp" and config.temporary_slot is False
    assert config.heartbeat.interval == 17.5 and config.heartbeat.timeout == 15.0
    assert config.limits.max_send_buffer_bytes == 8 * 1024**2
    assert config.log_level == "info" and config.log_json is False
    assert config.static_dir is None
    assert config.dsn_value == BASE_ENV["CDCDDP_DSN"]


def test_precedence_defaults_toml_env_cli(tmp_path: Path) -> None:
    toml = write(tmp_path, """
dsn = "host=filehost dbname=todos"
app = "cdcddp.examples.todos:app"
slot = "from_file"
listen = "0.0.0.0:4000"
log_level = "debug"
[heartbeat]
interval = 30
timeout = "20s"
""")
    only_file = load_config(toml, {})
    assert (only_file.slot, only_file.listen.port, only_file.log_level) == ("from_file", 4000,
                                                                          "debug")
    assert (only_file.heartbeat.interval, only_file.heartbeat.timeout) == (30.0, 20.0)
    assert only_file.limits.max_subscriptions == 1000  # default under a file that omits it

    env = {"CDCDDP_SLOT": "from_env", "CDCDDP_LISTEN": "0.0.0.0:5000",
           "CDCDDP_HEARTBEAT__TIMEOUT": "500ms", "CDCDDP_LOG_JSON": "true"}
    file_env = load_config(toml, env)
    assert (file_env.slot, file_env.listen.port, file_env.log_json) == ("from_env", 5000, True)
    assert file_env.heartbeat.interval == 30.0  # the file's, env set only timeout
    assert file_env.heartbeat.timeout == 0.5

    all_three = load_config(toml, env, {"slot": "from_cli", "heartbeat.timeout": 2,
                                        "listen": None, "log_json": False})
    assert all_three.slot == "from_cli"
    assert all_three.heartbeat.timeout == 2.0
    assert all_three.listen.port == 5000  # None: flag not given
    assert all_three.log_json is False


def test_units_and_forms() -> None:
    config = load_config(None, {**BASE_ENV, "CDCDDP_LIMITS__MAX_SEND_BUFFER_BYTES": "16MB",
                                "CDCDDP_LIMITS__MAX_MESSAGE_BYTES": "512kB",
                                "CDCDDP_HEARTBEAT__INTERVAL": "1min",
                                "CDCDDP_METRICS_LISTEN": "off", "CDCDDP_LISTEN": "[::]:3000",
                                "CDCDDP_LOG_LEVEL": "WARNING", "CDCDDP_TEMPORARY_SLOT": "yes"})
    assert config.limits.max_send_buffer_bytes == 16 * 1024**2
    assert config.limits.max_message_bytes == 512 * 1024
    assert config.heartbeat.interval == 60.0
    assert config.metrics_listen is None
    assert config.listen == HostPort("::", 3000) and str(config.listen) == "[::]:3000"
    assert config.log_level == "warning" and config.temporary_slot is True


def test_other_cdcddp_variables_and_empty_values_are_ignored() -> None:
    config = load_config(None, {**BASE_ENV, "CDCDDP_PG_BINDIR": "/usr/lib/postgresql/15/bin",
                                "CDCDDP_SLOT": "", "PATH": "/bin"})
    assert config.slot == "cdcddp"


def test_server_and_session_config() -> None:
    config = load_config(None, {**BASE_ENV, "CDCDDP_HEARTBEAT__INTERVAL": "5",
                                "CDCDDP_LIMITS__MAX_SUBSCRIPTIONS": "7",
                                "CDCDDP_LIMITS__MAX_SEND_BUFFER_BYTES": "1MB"})
    server = config.server_config()
    assert server.session.heartbeat_interval == 5.0
    assert server.session.max_subscriptions == 7
    assert server.max_send_buffer_bytes == 1024**2


def test_static_dir(tmp_path: Path) -> None:
    assert load_config(None, {**BASE_ENV, "CDCDDP_STATIC_DIR": str(tmp_path)}).static_dir == \
        tmp_path
    message = error_of(None, {**BASE_ENV, "CDCDDP_STATIC_DIR": str(tmp_path / "nope")})
    assert message.startswith("static_dir: expected an existing directory")


# -- errors: one sentence naming the key and the source ------------------------------------------


@pytest.mark.parametrize(("env", "expected"), [
    ({"CDCDDP_LISTEN": "abc"},
     "listen: expected HOST:PORT (like 127.0.0.1:3000 or [::]:3000), got 'abc' "
     "(from CDCDDP_LISTEN)."),
    ({"CDCDDP_LISTEN": "127.0.0.1:70000"}, "listen: expected HOST:PORT"),
    ({"CDCDDP_METRICS_LISTEN": "9108"}, "metrics_listen: expected HOST:PORT"),
    ({"CDCDDP_SLOT": "Bad-Name"}, "slot: expected 1 to 63 lower-case letters"),
    ({"CDCDDP_APP": "todos"}, "app: expected module:attribute"),
    ({"CDCDDP_HEARTBEAT__INTERVAL": "soon"},
     "heartbeat.interval: expected seconds or a duration like 30s"),
    ({"CDCDDP_HEARTBEAT__TIMEOUT": "5 fortnights"}, "heartbeat.timeout: expected seconds"),
    ({"CDCDDP_LIMITS__MAX_SUBSCRIPTIONS": "many"},
     "limits.max_subscriptions: expected an integer, got 'many' "
     "(from CDCDDP_LIMITS__MAX_SUBSCRIPTIONS)."),
    ({"CDCDDP_LIMITS__MAX_PENDING_METHODS": "0"},
     "limits.max_pending_methods: expected a value greater than 0, got '0'"),
    ({"CDCDDP_LIMITS__MAX_SEND_BUFFER_BYTES": "8 parsecs"},
     "limits.max_send_buffer_bytes: expected bytes or a size like"),
    ({"CDCDDP_READINESS_MAX_LAG_BYTES": "0"}, "readiness_max_lag_bytes: expected a size above"),
    ({"CDCDDP_LOG_LEVEL": "loud"},
     "log_level: expected 'debug', 'info', 'warning' or 'error', got 'loud' "
     "(from CDCDDP_LOG_LEVEL)."),
    ({"CDCDDP_LOG_JSON": "maybe"}, "log_json: expected true or false, got 'maybe'"),
    ({"CDCDDP_HEARTBEAT": "5"}, "heartbeat: is a section, set one of its keys as "
     "CDCDDP_HEARTBEAT__<KEY>"),
    ({"CDCDDP_HEARTBEAT__INTERVL": "5"},
     "heartbeat.intervl: unknown key (from CDCDDP_HEARTBEAT__INTERVL); did you mean "
     "'interval'? known keys: interval, timeout."),
    ({"CDCDDP_SLOT__NAME": "x"}, "slot.name: unknown key, slot has no sub-keys"),
    ({"CDCDDP_NOPE__X": "1"}, "nope.x: unknown key (from CDCDDP_NOPE__X)"),
])
def test_env_errors(env: dict[str, str], expected: str) -> None:
    message = error_of(None, {**BASE_ENV, **env})
    assert message.startswith(expected), message
    assert next(iter(env)) in message  # names where the value came from


def test_missing_required_keys() -> None:
    assert error_of(None, {"CDCDDP_APP": "a:b"}) == (
        "dsn: required, set it in the config file, as CDCDDP_DSN or with --dsn.")
    assert error_of(None, {"CDCDDP_DSN": "dbname=x"}) == (
        "app: required, set it in the config file, as CDCDDP_APP or with --app.")
    assert error_of(None, {}).endswith("(and 1 more problem).")


def test_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    assert error_of(missing) == f"config file {missing}: not found; check --config."
    assert error_of(tmp_path).endswith("is a directory, not a TOML file.")
    broken = write(tmp_path, "listen = \n")
    assert error_of(broken).startswith(f"config file {broken}: invalid TOML (")


def test_unknown_keys_in_the_file_are_refused(tmp_path: Path) -> None:
    toml = write(tmp_path, 'lisen = "0.0.0.0:3000"\n')
    assert error_of(toml, BASE_ENV) == (
        f"lisen: unknown key (from {toml}); did you mean 'listen'? known keys: "
        + ", ".join(Config.model_fields) + ".")
    toml = write(tmp_path, "[limits]\nmax_subs = 5\n")
    message = error_of(toml, BASE_ENV)
    assert message.startswith(f"limits.max_subs: unknown key (from {toml}); did you mean "
                              "'max_subscriptions'?")
    toml = write(tmp_path, "limits = 5\n")
    assert error_of(toml, BASE_ENV) == (
        f"limits: expected a table of keys ([limits] in TOML) (from {toml}).")


def test_file_value_errors_name_the_file(tmp_path: Path) -> None:
    toml = write(tmp_path, "[heartbeat]\ninterval = -3\n")
    message = error_of(toml, BASE_ENV)
    assert message.startswith("heartbeat.interval: expected a duration of 0 or more seconds")
    assert message.endswith(f"(from {toml}).")


def test_cli_errors_name_the_flag() -> None:
    assert error_of(None, BASE_ENV, {"listen": "nowhere"}).endswith("(from --listen).")
    assert error_of(None, BASE_ENV, {"heartbeat.timeout": "x"}).endswith(
        "(from --heartbeat-timeout).")


def test_bad_dsn_is_reported_without_echoing_it() -> None:
    bad = f"host=x password={SECRET} dbname"
    message = error_of(None, {**BASE_ENV, "CDCDDP_DSN": bad})
    assert message == ("dsn: not a valid libpq connection string (key=value pairs) or "
                       "postgresql:// URI (from CDCDDP_DSN).")
    assert SECRET not in message


# -- rendering -----------------------------------------------------------------------------------


def test_render_masks_the_password_and_round_trips(tmp_path: Path) -> None:
    for dsn in (BASE_ENV["CDCDDP_DSN"], f"host=db password={SECRET} dbname=todos",
                f"host=db password='{SECRET}' user=app"):
        config = load_config(None, {**BASE_ENV, "CDCDDP_DSN": dsn})
        text = render_config(config)
        assert SECRET not in text and SECRET not in repr(config) and SECRET not in str(config)
        assert "****" in text
        assert "db" in text  # the rest of the DSN stays readable
    config = load_config(None, {**BASE_ENV, "CDCDDP_LISTEN": "[::1]:3001",
                                "CDCDDP_HEARTBEAT__INTERVAL": "2.5"})
    rendered = render_config(config)
    parsed = tomllib.loads(rendered)
    assert parsed["listen"] == "[::1]:3001" and parsed["heartbeat"]["interval"] == 2.5
    assert "# static_dir = (not set)" in rendered
    # The rendered file is a valid config (the masked password aside).
    again = load_config(write(tmp_path, rendered), {})
    assert again.model_dump(exclude={"dsn"}) == config.model_dump(exclude={"dsn"})


def test_argparse_flags_feed_load_config() -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, skip=("app",))
    args = parser.parse_args(["--listen", "0.0.0.0:1", "--heartbeat-interval", "3s",
                              "--log-json", "--limits-max-subscriptions", "9"])
    overrides = cli_overrides_from_args(args)
    assert overrides == {"listen": "0.0.0.0:1", "heartbeat.interval": "3s", "log_json": True,
                         "limits.max_subscriptions": "9"}
    config = load_config(None, BASE_ENV, overrides)
    assert (config.listen.port, config.heartbeat.interval, config.log_json,
            config.limits.max_subscriptions) == (1, 3.0, True, 9)
    assert parser.parse_args([]).config is None
    # One flag and one environment variable per key.
    assert len({env_name(k) for k in leaf_keys()}) == len(leaf_keys())


# -- logging -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    f"connecting to postgresql://app:{SECRET}@db:5432/todos",
    f"dsn host=db password={SECRET} dbname=x",
    f"dsn host=db password='{SECRET} with space' dbname=x",
    f"PASSWORD = {SECRET}",
    f"token={SECRET}&x=1",
])
def test_mask_secrets(text: str) -> None:
    masked = mask_secrets(text)
    assert SECRET not in masked and "****" in masked


def test_mask_secrets_leaves_ordinary_text() -> None:
    text = "applied 12 changes to public.todos at 0/16B3748 (x=1)"
    assert mask_secrets(text) == text


@pytest.fixture
def restore_logging() -> Any:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def test_json_logs(restore_logging: None) -> None:
    out = io.StringIO()
    setup_logging("debug", json=True, stream=out)
    log = logging.getLogger("cdcddp.test")
    log.info("connecting to %s", f"host=db password={SECRET}",
             extra={"slot": "cdcddp", "lag_bytes": 42, "password": SECRET})
    try:
        raise RuntimeError(f"failed: postgresql://u:{SECRET}@h/db")
    except RuntimeError:
        log.exception("stream failed")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and SECRET not in out.getvalue()
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "info" and first["logger"] == "cdcddp.test"
    assert first["message"] == "connecting to host=db password=****"
    assert first["slot"] == "cdcddp" and first["lag_bytes"] == 42
    assert first["password"] == "****"
    assert first["time"].endswith("Z")
    assert second["level"] == "error" and "RuntimeError" in second["exception"]


def test_text_logs_level_and_replacement(restore_logging: None) -> None:
    first, out = io.StringIO(), io.StringIO()
    setup_logging("info", json=False, stream=first)
    setup_logging("warning", json=False, stream=out)  # replaces, does not add
    log = logging.getLogger("cdcddp.test")
    log.info("hidden")
    log.warning("dsn %s", f"postgresql://u:{SECRET}@h/db")
    assert first.getvalue() == ""
    assert out.getvalue().count("\n") == 1
    assert "WARNING cdcddp.test: dsn postgresql://u:****@h/db" in out.getvalue()
    with pytest.raises(ValueError, match="log_level"):
        setup_logging("loud")
