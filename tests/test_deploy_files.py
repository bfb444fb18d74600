"""Static validation of deploy/: no Docker engine, Prometheus or Grafana runs here, so each file
is parsed and cross-checked against the code it describes (metric names, config defaults,
paths in the repository) and, for the PostgreSQL settings, against a real server."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from cdcddp.config import env_name, leaf_keys, load_config
from cdcddp.devcluster import LocalCluster
from cdcddp.metrics import WAL_STATUSES, Metrics

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
METRIC_NAME = re.compile(r"\bcdcddp_[a-z0-9_]+")
DEMO_PASSWORD = "compose-demo-password"


def load_yaml(relative: str) -> Any:
    return yaml.safe_load((DEPLOY / relative).read_text())


@pytest.fixture(scope="module")
def metric_names() -> set[str]:
    return Metrics().names()


def check_metric_names(expr: str, known: set[str], where: str) -> list[str]:
    """The cdcddp_* names an expression uses; fails on any the registry does not expose."""
    names = METRIC_NAME.findall(expr)
    for name in names:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in known or base in known, f"{where}: {name} is not defined in cdcddp.metrics"
    return names


def interpolate(text: str) -> str:
    """Compose's ${VAR:-default} with VAR unset (POSTGRES_PASSWORD set to a test value)."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}",
                  lambda m: DEMO_PASSWORD if m[1] == "POSTGRES_PASSWORD" else (m[2] or ""), text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(interpolate((DEPLOY / "compose.yaml").read_text()))


def container_ports(service: dict[str, Any]) -> dict[int, str]:
    """Published container port -> host binding."""
    out = {}
    for mapping in service.get("ports", []):
        *host, container = str(mapping).split(":")
        out[int(container)] = ":".join(host)
    return out


# -- compose ---------------------------------------------------------------------------------------


def test_compose_services_and_files_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "cdcddp", "prometheus", "grafana"}
    for name, service in services.items():
        build = service.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert context.is_dir(), f"{name}: build context {context} missing"
            assert (context / build["dockerfile"]).is_file(), f"{name}: dockerfile missing"
        else:
            assert re.match(r"^[\w./-]+:[\w.-]+$", service["image"]), f"{name}: pin a tag"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: mounted {source} does not exist"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} not declared"


def test_compose_postgres_has_schema_and_logical_wal(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    init = {v.split(":")[1]: v.split(":")[0] for v in postgres["volumes"]
            if ":/docker-entrypoint-initdb.d/" in v}
    # Run in name order: accounts first (todos references users).
    assert [Path(init[k]).name for k in sorted(init)] == ["accounts.sql", "todos.sql"]
    settings = compose_settings(compose)
    assert settings["wal_level"] == "logical"
    assert "max_slot_wal_keep_size" in settings
    assert "wal2json" in settings["output_plugin_libraries"].replace(" ", "").split(",")
    dockerfile = (DEPLOY / postgres["build"]["dockerfile"]).read_text()
    assert "FROM postgres:15" in dockerfile and "wal2json" in dockerfile
    assert postgres["environment"]["POSTGRES_DB"] == "todos"


def compose_settings(compose: dict[str, Any]) -> dict[str, str]:
    command = compose["services"]["postgres"]["command"]
    assert command[0] == "postgres"
    pairs = [command[i + 1] for i, arg in enumerate(command) if arg == "-c"]
    return dict(pair.split("=", 1) for pair in pairs)


def test_compose_cdcddp_config_matches_ports_and_database(compose: dict[str, Any]) -> None:
    service = compose["services"]["cdcddp"]
    env = {k: str(v) for k, v in service["environment"].items()}
    assert set(env) <= {env_name(k) for k in leaf_keys()}, "unknown CDCDDP_* variable"
    config = load_config(None, env, {"app": service["command"][1]})
    ports = container_ports(service)
    assert config.listen.port in ports and config.metrics_listen is not None
    assert config.metrics_listen.port in ports
    # The defaults are what a bare `cdcddp serve` uses: the same ports.
    defaults = load_config(None, {"CDCDDP_DSN": "dbname=x", "CDCDDP_APP": "a:b"})
    assert (defaults.listen.port, defaults.metrics_listen.port) == (  # type: ignore[union-attr]
        config.listen.port, config.metrics_listen.port)
    postgres = compose["services"]["postgres"]
    dsn = psycopg.conninfo.conninfo_to_dict(config.dsn_value)
    assert dsn["host"] == "postgres" and dsn["dbname"] == postgres["environment"]["POSTGRES_DB"]
    assert dsn["password"] == DEMO_PASSWORD  # the same variable feeds both services
    assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert service["command"] == ["serve", "cdcddp.examples.todos:app"]


def test_prometheus_scrapes_cdcddp_and_loads_the_rules(compose: dict[str, Any]) -> None:
    prometheus = load_yaml("prometheus/prometheus.yml")
    mounts = dict(v.split(":")[:2] for v in compose["services"]["prometheus"]["volumes"])
    mounted = {target: source for source, target in mounts.items()}
    for rule_file in prometheus["rule_files"]:
        assert (DEPLOY / mounted[rule_file]).resolve() == DEPLOY / "prometheus/alerts.yml"
    job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "cdcddp")
    target = job["static_configs"][0]["targets"][0]
    host, port = target.split(":")
    assert host == "cdcddp"
    env = compose["services"]["cdcddp"]["environment"]
    assert int(port) == int(env["CDCDDP_METRICS_LISTEN"].rsplit(":", 1)[1])
    assert job.get("metrics_path", "/metrics") == "/metrics"


# -- alert rules -----------------------------------------------------------------------------------

DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


def test_alert_rules_are_complete(metric_names: set[str]) -> None:
    rules = [rule for group in load_yaml("prometheus/alerts.yml")["groups"]
             for rule in group["rules"]]
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
        assert re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", rule["alert"])
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"].strip()
        if "for" in rule:
            assert DURATION.match(rule["for"]), rule["for"]
        assert check_metric_names(rule["expr"], metric_names, rule["alert"])
        # Label values the code can produce.
        for status in re.findall(r'status="(\w+)"', rule["expr"]):
            assert status in WAL_STATUSES
        # Template syntax at least balanced.
        for text in rule["annotations"].values():
            assert text.count("{{") == text.count("}}")
    exprs = " ".join(rule["expr"] for rule in rules)
    for required in ("cdcddp_replication_slot_lag_bytes",
                     "cdcddp_replication_slot_retained_wal_bytes",
                     "cdcddp_replication_stream_connected", 'status="lost"',
                     "cdcddp_commit_to_send_seconds_bucket"):
        assert required in exprs
    disconnected = next(r for r in rules if "cdcddp_replication_stream_connected" in r["expr"])
    assert disconnected["for"] == "1m"


# -- grafana ---------------------------------------------------------------------------------------


def test_dashboard_uses_defined_metrics_and_the_provisioned_datasource(
        metric_names: set[str], compose: dict[str, Any]) -> None:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/cdcddp.json").read_text())
    datasource = load_yaml("grafana/provisioning/datasources/prometheus.yml")["datasources"][0]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    used: set[str] = set()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"]["uid"] == datasource["uid"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"]
            used.update(check_metric_names(target["expr"], metric_names, panel["title"]))
    # Every family has a panel (apart from bookkeeping ones).
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in metric_names}
    shown = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert families - shown <= {"cdcddp_build_info", "cdcddp_replication_slot_polls_total",
                                "cdcddp_replication_slot_active",
                                "cdcddp_replication_slot_confirmed_flush_lsn"}
    provider = load_yaml("grafana/provisioning/dashboards/cdcddp.yml")["providers"][0]
    mounts = [v.split(":") for v in compose["services"]["grafana"]["volumes"]]
    assert any(target == provider["options"]["path"]
               and (DEPLOY / source).resolve() == DEPLOY / "grafana/dashboards"
               for source, target, *_ in mounts)
    assert datasource["url"] == "http://prometheus:9090"


# -- Dockerfile ------------------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def dockerignore_allows(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins (``!`` re-includes)."""
    allowed = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        bare = pattern.lstrip("!").rstrip("/")
        if bare == "*" or path == bare or path.startswith(bare + "/"):
            allowed = negate
    return allowed


def test_dockerfile(compose: dict[str, Any]) -> None:
    instructions = dockerfile_instructions(DEPLOY / "Dockerfile")
    keywords = [k for k, _ in instructions]
    base = next(rest for k, rest in instructions if k == "FROM")
    assert base.startswith(("python:3.11-slim", "debian:bookworm"))
    ignore = [line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text()
              .splitlines() if line.strip() and not line.startswith("#")]
    for keyword, rest in instructions:
        if keyword == "COPY" and "--from" not in rest:
            *sources, _dest = shlex.split(rest)
            for source in sources:
                assert (REPO / source).exists(), f"COPY source {source} does not exist"
                assert dockerignore_allows(source, ignore), f"{source} is excluded by .dockerignore"
    # cdcddp.methods.schema reads <package parent>/schema: true only for an editable install
    # from WORKDIR with schema/ beside the package.
    workdir = next(rest for k, rest in instructions if k == "WORKDIR")
    assert any(k == "COPY" and rest.split()[-1].rstrip("/") in ("./schema", f"{workdir}/schema")
               for k, rest in instructions)
    assert any(k == "RUN" and "pip install" in rest and " -e ." in rest
               for k, rest in instructions)
    user = next(rest for k, rest in instructions if k == "USER")
    assert not user.startswith(("root", "0"))
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")
    healthcheck = next(rest for k, rest in instructions if k == "HEALTHCHECK")
    assert "/healthz" in healthcheck
    entry = json.loads(next(rest for k, rest in instructions if k == "ENTRYPOINT"))
    cmd = json.loads(next(rest for k, rest in instructions if k == "CMD"))
    assert entry + cmd == ["cdcddp", "serve", "cdcddp.examples.todos:app"]
    env = dict(pair.split("=", 1) for k, rest in instructions if k == "ENV"
               for pair in shlex.split(rest))
    config = load_config(None, {**env, "CDCDDP_DSN": "host=db dbname=todos"}, {"app": cmd[1]})
    exposed = {int(p) for k, rest in instructions if k == "EXPOSE" for p in rest.split()}
    assert config.metrics_listen is not None
    assert {config.listen.port, config.metrics_listen.port} == exposed
    assert f":{config.listen.port}/healthz" in healthcheck
    # The compose service builds this file.
    assert compose["services"]["cdcddp"]["build"]["dockerfile"] == "deploy/Dockerfile"


# -- systemd ---------------------------------------------------------------------------------------


def test_systemd_unit() -> None:
    path = DEPLOY / "systemd/cdcddp.service"
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    unit.read_string(path.read_text())
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[0]).name == "cdcddp" and argv[1] == "serve"
    assert argv[argv.index("--config") + 1] == "/etc/cdcddp/cdcddp.toml"
    assert service["Restart"] == "on-failure" and service["KillSignal"] == "SIGTERM"
    assert service["TimeoutStopSec"]
    assert service.get("DynamicUser") == "yes" or service.get("User") not in (None, "root")
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    # The binary is not installed here: point ExecStart at one that exists, keep the rest.
    text = (DEPLOY / "systemd/cdcddp.service").read_text()
    text = re.sub(r"(?m)^ExecStart=\S+", "ExecStart=/bin/true", text)
    copy = tmp_path / "cdcddp.service"
    copy.write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                          text=True, check=False, timeout=30)
    # Unknown or misspelt directives are only warnings: any output at all fails.
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stderr


# -- example configuration -------------------------------------------------------------------------


def test_example_toml_loads_and_documents_every_key() -> None:
    path = DEPLOY / "cdcddp.example.toml"
    config = load_config(path, {})
    assert config.app == "cdcddp.examples.todos:app"
    assert config.listen.port == 3000
    text = path.read_text()
    data = tomllib.loads(text)
    present = {(k,) for k, v in data.items() if not isinstance(v, dict)}
    present |= {(k, sub) for k, v in data.items() if isinstance(v, dict) for sub in v}
    commented = {(m,) for m in re.findall(r"(?m)^# (\w+) = ", text)}
    assert set(leaf_keys()) == present | commented
    assert "password" not in data["dsn"]


# -- PostgreSQL settings against a real server -----------------------------------------------------


def conf_settings(text: str, include_commented: bool = True) -> dict[str, str]:
    # [ \t], not \s: a trailing comment must not run into the next line.
    pattern = r"(?m)^#?(\w+) = (.+?)[ \t]*(?:#.*)?$" if include_commented else \
        r"(?m)^(\w+) = (.+?)[ \t]*(?:#.*)?$"
    return {name: value.strip("'") for name, value in re.findall(pattern, text)}


@pytest.fixture(scope="module")
def snippet() -> dict[str, str]:
    return conf_settings((DEPLOY / "postgresql.conf").read_text())


def test_snippet_has_what_cdcddp_needs(snippet: dict[str, str]) -> None:
    assert set(snippet) == {"wal_level", "max_replication_slots", "max_wal_senders",
                            "max_slot_wal_keep_size", "wal_sender_timeout",
                            "logical_decoding_work_mem", "output_plugin_libraries",
                            "hot_standby_feedback", "primary_slot_name"}
    active = conf_settings((DEPLOY / "postgresql.conf").read_text(), include_commented=False)
    assert active["wal_level"] == "logical"
    assert "wal2json" in active["output_plugin_libraries"].replace(" ", "").split(",")
    assert "primary_slot_name" not in active  # standby-only: left commented


def postgres_accepts(cluster: LocalCluster, settings: dict[str, str]) -> Iterator[str]:
    """Problems PostgreSQL reports for these settings: `postgres -C` parses the -c values with
    the server's own rules (units, ranges, enums) and exits, even beside a running server."""
    args = [arg for name, value in settings.items() for arg in ("-c", f"{name}={value}")]
    for name in settings:
        proc = cluster._run("postgres", "-D", str(cluster.datadir), *args, "-C", name,
                            check=False)
        if proc.returncode != 0:
            yield proc.stderr.strip()


def test_snippet_settings_are_accepted_by_postgresql(pg_cluster: LocalCluster,
                                                     snippet: dict[str, str]) -> None:
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
        rows = conn.execute("SELECT name, vartype, enumvals FROM pg_settings WHERE name = ANY(%s)",
                            (list(snippet),)).fetchall()
    known = {name: (vartype, enumvals) for name, vartype, enumvals in rows}
    assert set(known) == set(snippet), f"unknown settings: {set(snippet) - set(known)}"
    for name, value in snippet.items():
        vartype, enumvals = known[name]
        if vartype == "enum":
            assert value in enumvals, f"{name} = {value}: not one of {enumvals}"
    assert list(postgres_accepts(pg_cluster, snippet)) == []


def test_compose_settings_are_accepted_by_postgresql(pg_cluster: LocalCluster,
                                                     compose: dict[str, Any],
                                                     snippet: dict[str, str]) -> None:
    settings = compose_settings(compose)
    assert set(settings) <= set(snippet)  # each one explained in the snippet
    assert list(postgres_accepts(pg_cluster, settings)) == []


def test_postgres_check_rejects_a_bad_value(pg_cluster: LocalCluster) -> None:
    problems = list(postgres_accepts(pg_cluster, {"max_slot_wal_keep_size": "2GiB"}))
    assert problems and "max_slot_wal_keep_size" in problems[0]
