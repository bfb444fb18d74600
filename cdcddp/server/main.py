"""``cdcddp serve``: everything one server process runs, wired from one ``Config``.

The DDP/HTTP server (with the static page), the Prometheus endpoint and the slot poller run in
one trio nursery; SIGINT/SIGTERM stop accepting, close sessions with 1001 and let every task
finish what it applied.
"""

from __future__ import annotations

import logging
import signal

import trio

from cdcddp.app import App, load_app
from cdcddp.config import Config
from cdcddp.db import Database
from cdcddp.methods.schema import apply_schema
from cdcddp.metrics import Metrics, poll_slot, serve_metrics
from cdcddp.publish.livedata import LiveDataConfig
from cdcddp.server.server import Server
from cdcddp.server.static import StaticFiles

log = logging.getLogger("cdcddp.server")


def build_server(app: App, config: Config, database: Database,
                 metrics: Metrics | None = None) -> Server:
    server_config = config.server_config()
    server_config.static = StaticFiles(config.static_dir)
    live = LiveDataConfig(slot=config.slot, temporary_slot=config.temporary_slot,
                          failover_slot=config.failover_slot,
                          resync_behind_bytes=config.resync_behind_bytes)
    return Server(app, server_config, dsn=config.dsn_value, database=database, live_config=live,
                  metrics=metrics)


async def run(config: Config, *,
              task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``config.app`` until SIGINT/SIGTERM (or cancellation); reports the DDP port."""
    app = load_app(config.app)
    metrics = Metrics()
    # Every query goes to the primary; the stream and the slot poller to dsn (a standby, with
    # primary_dsn: see cdcddp.publish.livedata.LiveData).
    database = Database(config.primary_dsn_value or config.dsn_value, application_name="cdcddp")
    slot_server = database if config.primary_dsn_value is None else Database(
        config.dsn_value, size=1, application_name="cdcddp")
    server = build_server(app, config, database, metrics)
    try:
        if app.schemas:  # idempotent schema files the app asks for (before the slot starts)
            await apply_schema(database, *app.schemas)
            log.info("applied schema %s", ", ".join(app.schemas))
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                if config.metrics_listen is not None:
                    await nursery.start(serve_metrics, metrics, config.metrics_listen.host,
                                        config.metrics_listen.port)
                nursery.start_soon(poll_slot, metrics, slot_server, config.slot,
                                   config.slot_poll_interval)
                port = await nursery.start(server.serve, config.listen.host, config.listen.port)
                log.info("serving %s on http://%s:%s/", config.app, config.listen.host, port)
                task_status.started(port)
                async for signum in signals:
                    log.info("received %s, shutting down", signal.Signals(signum).name)
                    await server.shutdown()
                    nursery.cancel_scope.cancel()
                    break
    finally:
        database.close()
        if slot_server is not database:
            slot_server.close()
