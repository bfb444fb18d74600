"""The documentation cannot drift from the code: the configuration reference is generated from
the model, and every metric, alert, command and link the guides name exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from cdcddp.cli import build_parser
from cdcddp.config import config_reference, env_name, flag_name, leaf_keys
from cdcddp.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SLOT_NAMES = {"cdcddp_app"}  # example slot names that look like metric names
GENERATED = re.compile(r"<!-- BEGIN generated[^\n]*-->\n(.*?)<!-- END generated -->", re.DOTALL)


def test_configuration_reference_is_the_generated_table() -> None:
    text = (DOCS / "configuration.md").read_text()
    blocks = GENERATED.findall(text)
    assert len(blocks) == 1
    assert blocks[0] == config_reference(), (
        "docs/configuration.md is stale: paste the output of `cdcddp config reference`")
    for path in leaf_keys():  # every key, with its environment variable and flag
        key = ".".join(path)
        assert f"| `{key}` | `{env_name(path)}` |" in blocks[0]
        assert path == ("app",) or f"`{flag_name(path)}`" in blocks[0]


def test_config_reference_command_prints_it() -> None:
    done = subprocess.run([sys.executable, "-m", "cdcddp.cli", "config", "reference"],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout == config_reference()


def test_guides_name_only_real_metrics_alerts_and_commands() -> None:
    known_metrics = Metrics().names()
    alerts = {rule["alert"]
              for group in yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
              ["groups"] for rule in group["rules"]}
    commands = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    for doc in (DOCS / "operations.md", DOCS / "configuration.md", ROOT / "README.md"):
        text = doc.read_text()
        for name in set(re.findall(r"\bcdcddp_[a-z_]+[a-z]\b", text)):
            if name in SLOT_NAMES:
                continue
            family = {name, f"{name}_bucket", f"{name}_total"}  # histograms, counters
            assert family & known_metrics, f"{doc.name}: {name} is not in cdcddp.metrics"
        for alert in set(re.findall(r"\bCdcddp[A-Z][A-Za-z]+\b", text)):
            assert alert in alerts, f"{doc.name}: alert {alert} is not in alerts.yml"
        for command in set(re.findall(r"`cdcddp (?:-v )?([a-z]+)\b", text)):
            assert command in commands, f"{doc.name}: no `cdcddp {command}` command"
    assert {"CdcddpSlotInvalidated", "CdcddpSlotNearInvalidation", "CdcddpRetainedWalHigh"} \
        <= set(re.findall(r"\bCdcddp[A-Z][A-Za-z]+\b", (DOCS / "operations.md").read_text()))


def test_relative_links_resolve() -> None:
    for doc in (DOCS / "operations.md", DOCS / "configuration.md", ROOT / "README.md"):
        text = doc.read_text()
        anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                   for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            if path:
                assert (doc.parent / path).exists(), f"{doc.name}: broken link {target}"
            elif anchor:
                assert anchor in anchors, f"{doc.name}: no heading for #{anchor}"
    readme = (ROOT / "README.md").read_text()
    assert "(docs/operations.md)" in readme and "(docs/configuration.md)" in readme
