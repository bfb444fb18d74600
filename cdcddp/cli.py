"""``cdcddp`` command line: ``tail`` (the typed change feed) and ``slot create|drop|status``.

Errors are one line on stderr (exit 1; usage errors exit 2), never a traceback.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime as dt
import decimal
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import orjson
import psycopg
import trio

from cdcddp.db import first_line
from cdcddp.wal import slot as slots
from cdcddp.wal.events import Begin, Commit, StreamEvent
from cdcddp.wal.lsn import format_lsn, parse_lsn
from cdcddp.wal.preflight import STANDBY_NEEDS_PRIMARY, server_role

_ACTIONS = {Begin: "B", Commit: "C"}
_LSN_FIELDS = ("lsn", "end_lsn")


class CliError(Exception):
    """An operator mistake or an unusable server; printed as one line."""


# -- JSON rendering of events -------------------------------------------------------------


def _iso_duration(value: dt.timedelta) -> str:
    sign = "-" if value < dt.timedelta(0) else ""
    value = abs(value)
    seconds = value.seconds + value.microseconds / 1e6
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{sign}P{value.days}DT{int(hours)}H{int(minutes)}M{secs:g}S"


def json_default(value: Any) -> Any:
    """Values orjson has no native form for (datetimes, UUIDs and dataclasses it has)."""
    if isinstance(value, decimal.Decimal):
        return str(value)  # exact: a JSON number would go through float in most readers
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, dt.timedelta):
        return _iso_duration(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)  # ranges, inet, ... : their text form


def event_record(event: StreamEvent) -> dict[str, Any]:
    record: dict[str, Any] = {"action": _ACTIONS.get(type(event), getattr(event, "action", "?"))}
    for f in dataclasses.fields(event):  # type: ignore[arg-type]
        if f.name == "action":
            continue
        value = getattr(event, f.name)
        if f.name in _LSN_FIELDS and isinstance(value, int):
            value = format_lsn(value)
        record[f.name] = value
    return record


def render_event(event: StreamEvent) -> bytes:
    record = event_record(event)
    try:
        return orjson.dumps(record, default=json_default, option=orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError:  # e.g. integers beyond 64 bits
        return json.dumps(record, default=json_default, ensure_ascii=False).encode()


# -- commands ------------------------------------------------------------------------------


def _connect(dsn: str, flag: str = "--dsn") -> psycopg.Connection:
    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    except psycopg.Error as exc:
        raise CliError(f"cannot connect to PostgreSQL ({first_line(exc)}): check {flag}."
                       ) from None


def _check_servers(dsn: str, primary_dsn: str | None) -> int:
    """``dsn`` may be a standby (PostgreSQL 16+) only with ``primary_dsn`` naming its primary,
    where every query goes; each problem is one sentence. Returns dsn's server_version_num."""
    with _connect(dsn) as conn:
        standby, version, system = _server_role(conn)
    if standby and version < 160000:
        raise CliError(f"dsn connects to a standby of PostgreSQL {version // 10000}, which "
                       "cannot decode (16 or later can): point --dsn at the primary.")
    if standby and primary_dsn is None:
        raise CliError(f"dsn connects to a standby: {STANDBY_NEEDS_PRIMARY}")
    if primary_dsn is not None:
        _check_primary(primary_dsn, system)
    return version


def _check_failover_slot(failover: bool, temporary: bool, version: int,
                         on_standby: bool) -> None:
    if not failover:
        return
    if temporary:
        raise CliError("failover_slot: a temporary slot cannot be a failover slot: turn one "
                       "of temporary_slot and failover_slot off.")
    if on_standby:
        raise CliError("failover_slot: a slot on a standby cannot be a failover slot (the "
                       "standby's own slot carries on when it is promoted): turn "
                       "failover_slot off.")
    why = slots.failover_unsupported(version)
    if why is not None:
        raise CliError(f"failover_slot: {why}: turn failover_slot off.")


def _check_primary(primary_dsn: str, system: int | None) -> None:
    """``primary_dsn`` must be a primary of the cluster whose system identifier is
    ``system`` (None: not known)."""
    with _connect(primary_dsn, "--primary-dsn") as conn:
        primary_standby, _version, primary_system = _server_role(conn)
    if primary_standby:
        raise CliError("primary_dsn connects to a standby: point --primary-dsn at the "
                       "primary.")
    if None not in (system, primary_system) and system != primary_system:
        raise CliError("dsn and primary_dsn connect to different clusters (their system "
                       "identifiers differ): point --dsn at a standby of that primary, or at "
                       "the primary itself.")


def _server_role(conn: psycopg.Connection) -> tuple[bool, int, int | None]:
    """(in recovery, server_version_num, system identifier or None when not readable)."""
    standby, version = server_role(conn)
    try:
        row = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
    except psycopg.errors.InsufficientPrivilege:
        row = None
    return standby, version, None if row is None else int(row[0])


def cmd_slot(args: argparse.Namespace) -> int:
    with _connect(args.dsn) as conn:
        if args.slot_command == "create":
            with slots.running_xacts_logged(args.primary_dsn):
                status = slots.create(conn, args.slot, failover=args.failover)
            print(f"created {'failover ' if status.failover else ''}replication slot "
                  f"{status.name} at {format_lsn(status.confirmed_flush_lsn or 0)}")
        elif args.slot_command == "drop":
            slots.drop(conn, args.slot)
            print(f"dropped replication slot {args.slot}")
        else:
            found = slots.get_status(conn, args.slot)
            if found is None:
                raise CliError(f"replication slot {args.slot!r} does not exist: create it with "
                               f"cdcddp slot create --slot {args.slot}.")
            info = found.as_dict()
            if args.json:
                print(json.dumps(info))
            else:
                for key, value in info.items():
                    if key == "safe_wal_size" and value is None:
                        value = "unlimited"
                    if key == "invalidation" and value is None:
                        value = "none"
                    shown = str(value).lower() if isinstance(value, bool) else value
                    print(f"{key}: {'' if shown is None else shown}")
    return 0


async def _watch_signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


def _standby_snapshot_logger(primary_dsn: str | None) -> Any:
    """For a stream on a standby: asks ``primary_dsn`` to log its running transactions."""
    if primary_dsn is None:
        return None

    def log_once() -> None:
        with psycopg.connect(primary_dsn, autocommit=True, connect_timeout=10) as conn:
            slots.log_running_xacts(conn)

    async def log_standby_snapshot() -> None:
        await trio.to_thread.run_sync(log_once)
    return log_standby_snapshot


async def _tail(args: argparse.Namespace) -> int:
    from cdcddp.wal.stream import open_stream, tables_option

    options = {"add-tables": tables_option(args.tables)} if args.tables else {}
    out = sys.stdout.buffer
    async with trio.open_nursery() as nursery:
        stop = trio.CancelScope()
        nursery.start_soon(_watch_signals, stop)
        with stop:  # a signal cancels the loop; leaving open_stream then stops cleanly
            async with open_stream(args.dsn, args.slot, create_slot=args.create,
                                   temporary=args.temporary, start_lsn=args.start_lsn,
                                   wal2json_options=options,
                                   status_interval=args.status_interval,
                                   log_standby_snapshot=_standby_snapshot_logger(
                                       args.primary_dsn)) as stream:
                async for event in stream:
                    out.write(render_event(event) + b"\n")
                    if isinstance(event, Commit):
                        out.flush()  # printed before acknowledged
                        stream.acknowledge(event.end_lsn)
        out.flush()
        nursery.cancel_scope.cancel()
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    if args.tables:
        from cdcddp.wal.preflight import check_table

        with _connect(args.dsn) as conn:
            for name in args.tables:
                finding = check_table(conn, name)
                if finding.severity != "ok":
                    print(f"cdcddp: warning: {finding.message}", file=sys.stderr)
    try:
        return trio.run(_tail, args)
    except BrokenPipeError:
        # The reader went away (| head): stop quietly and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _app_publications(spec: str) -> list[Any]:
    """The publications an app declares: ``app.publications`` or the module's
    ``publications`` (a ``cdcddp.publish.definition.Publications``)."""
    import importlib

    from cdcddp.publish.definition import Publications

    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CliError(f"cannot import {module_name!r} ({exc}): check the APP argument") from None
    app = getattr(module, attribute or "app", None)
    for candidate in (getattr(app, "publications", None), getattr(module, "publications", None)):
        if isinstance(candidate, Publications):
            return [*candidate, *candidate.universal]
    raise CliError(f"{spec!r} declares no publications (no Publications object found)")


def cmd_check(args: argparse.Namespace) -> int:
    """Everything that can be wrong before serving, one line per finding."""
    from cdcddp.publish.check import check_publications
    from cdcddp.wal.preflight import Finding, errors, run_preflight

    publications = _app_publications(args.app)
    findings = run_preflight(args.dsn, slot=args.slot, primary_dsn=args.primary_dsn)
    if not any(f.code == "connect" for f in findings):
        with _connect(args.dsn) as conn:
            findings.extend(check_publications(conn, publications))
            system = None if args.primary_dsn is None else _server_role(conn)[2]
        if args.primary_dsn is not None:  # what serve would refuse of it, too
            try:
                _check_primary(args.primary_dsn, system)
            except CliError as exc:
                findings.append(Finding("error", "primary_dsn", str(exc)))
    findings = list(dict.fromkeys(findings))  # a table shared by several cursors: say it once
    for finding in findings:
        if finding.severity != "ok" or args.verbose:
            print(f"{finding.severity}: {finding.message}")
    failed = errors(findings)
    print(f"cdcddp check: {len(failed)} error(s), "
          f"{sum(f.severity == 'warning' for f in findings)} warning(s)")
    return 1 if failed else 0


def _load_config(args: argparse.Namespace) -> Any:
    from cdcddp.config import ConfigError, cli_overrides_from_args, load_config

    overrides = cli_overrides_from_args(args)
    if getattr(args, "app", None):
        overrides["app"] = args.app
    try:
        return load_config(args.config, os.environ, overrides)
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from cdcddp.logs import setup_logging
    from cdcddp.server.main import run

    config = _load_config(args)
    root = logging.getLogger()
    for handler in list(root.handlers):  # main()'s basicConfig: one (masking) handler only
        root.removeHandler(handler)
    setup_logging(config.log_level, json=config.log_json)
    try:
        load_app_or_fail(config.app)
        # An unusable DSN, or a standby without its primary: one sentence naming the flag.
        version = _check_servers(config.dsn_value, config.primary_dsn_value)
        _check_failover_slot(config.failover_slot, config.temporary_slot, version,
                             config.primary_dsn_value is not None)
        _check_listen("listen", config.listen)
        if config.metrics_listen is not None:
            _check_listen("metrics_listen", config.metrics_listen)
        trio.run(run, config)
    except KeyboardInterrupt:
        pass
    return 0


def _check_listen(key: str, address: Any) -> None:
    """Fail before touching the database if ``address`` cannot be bound (taken, not local)."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise CliError(f"{key}: cannot resolve {address} ({exc.strerror or exc}).") from None
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listener will
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            why = "address already in use" if exc.errno == errno.EADDRINUSE else (
                exc.strerror or str(exc))
            flag = "--" + key.replace("_", "-")
            raise CliError(f"{key}: cannot listen on {address} ({why}): stop what uses it "
                           f"or choose another {flag}.") from None


def load_app_or_fail(spec: str) -> Any:
    from cdcddp.app import load_app

    try:
        return load_app(spec)
    except (ImportError, TypeError) as exc:
        raise CliError(f"cannot load app {spec!r} ({exc}): give it as module:attribute") from None


def cmd_config_show(args: argparse.Namespace) -> int:
    from cdcddp.config import config_reference, render_config

    if args.config_command == "reference":  # every key, from the model (docs/configuration.md)
        print(config_reference(), end="")
        return 0
    print(render_config(_load_config(args)), end="")
    return 0


# -- parsing -------------------------------------------------------------------------------


def _lsn_arg(text: str) -> int:
    try:
        return parse_lsn(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an LSN (like 0/16B3748): {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdcddp", description="PostgreSQL as a Meteor backend.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        env_dsn = os.environ.get("CDCDDP_DSN")
        p.add_argument("--dsn", default=env_dsn, required=env_dsn is None,
                       help="libpq connection string (default: $CDCDDP_DSN)")
        p.add_argument("--slot", required=True, help="replication slot name")
        p.add_argument("--primary-dsn", default=os.environ.get("CDCDDP_PRIMARY_DSN") or None,
                       help="when --dsn is a standby: its primary, asked to log its running "
                            "transactions so that creating the slot takes moments "
                            "(default: $CDCDDP_PRIMARY_DSN)")

    tail = sub.add_parser("tail", help="print decoded changes as JSON lines")
    common(tail)
    tail.add_argument("--temporary", action="store_true",
                      help="use a temporary slot (gone when cdcddp stops)")
    tail.add_argument("--create", action=argparse.BooleanOptionalAction, default=True,
                      help="create the slot when missing (default: yes)")
    tail.add_argument("--tables", nargs="+", metavar="TABLE", default=[],
                      help="only these tables (schema.table; plain names mean public)")
    tail.add_argument("--start-lsn", type=_lsn_arg, default=None,
                      help="resume after this LSN (default: where the slot is)")
    tail.add_argument("--status-interval", type=float, default=10.0, metavar="SECONDS")
    tail.set_defaults(func=cmd_tail)

    slot = sub.add_parser("slot", help="create, drop or inspect the replication slot")
    slot.add_argument("slot_command", choices=["create", "drop", "status"])
    common(slot)
    slot.add_argument("--json", action="store_true", help="status as one JSON object")
    slot.add_argument("--failover", action="store_true",
                      help="create: a failover slot, which standbys with sync_replication_slots "
                           "keep a copy of (PostgreSQL 17+)")
    slot.set_defaults(func=cmd_slot)

    check = sub.add_parser("check", help="preflight: can this database serve this app?")
    check.add_argument("app", help="the application, as module:attribute")
    env_dsn = os.environ.get("CDCDDP_DSN")
    check.add_argument("--dsn", default=env_dsn, required=env_dsn is None,
                       help="libpq connection string (default: $CDCDDP_DSN)")
    check.add_argument("--slot", help="also check this replication slot")
    check.add_argument("--primary-dsn", default=os.environ.get("CDCDDP_PRIMARY_DSN") or None,
                       help="when --dsn is a standby: its primary (default: "
                            "$CDCDDP_PRIMARY_DSN)")
    check.set_defaults(func=cmd_check)

    from cdcddp.config import add_config_arguments

    serve = sub.add_parser("serve", help="serve an app's publications and methods over DDP")
    serve.add_argument("app", nargs="?", help="the application, as module:attribute")
    add_config_arguments(serve, skip=("app",))
    serve.set_defaults(func=cmd_serve)

    config = sub.add_parser("config", help="print the effective configuration (show) or "
                                           "every key as a Markdown table (reference)")
    config.add_argument("config_command", choices=["show", "reference"])
    config.add_argument("app", nargs="?", help="the application, as module:attribute")
    add_config_arguments(config, skip=("app",))
    config.set_defaults(func=cmd_config_show)
    return parser


def _leaf_errors(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaf_errors(sub)]
    return [exc]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="cdcddp: %(levelname)s: %(message)s", stream=sys.stderr)
    from cdcddp.wal.protocol import AcknowledgeError
    from cdcddp.wal.slot import SlotError

    try:
        code = args.func(args)
    except KeyboardInterrupt:
        code = 130
    except BaseException as exc:
        leaves = _leaf_errors(exc)
        known = (CliError, SlotError, AcknowledgeError, psycopg.Error, OSError)
        try:
            from cdcddp.wal.stream import StreamError

            known = (*known, StreamError)
        except ImportError:
            pass
        first = next((e for e in leaves if isinstance(e, known)), None)
        if first is None:
            raise
        print(f"cdcddp: {first_line(first)}", file=sys.stderr)
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
