"""The probe defaults are the README's: read from its "Any program" section, not copied
here, so the page and a probe loaded with nothing but its kind cannot drift apart."""

from __future__ import annotations

import ast
import re

from tron.common.config import parse_mesh
from tests.harness import REPO


def readme_defaults() -> dict:
    """What the README's sentence "Every probe also takes `interval` (2.0), ..." gives."""
    text = " ".join((REPO / "README.md").read_text().split())
    found = re.search(r"Every probe also takes (.*?`initial_delay` \([\d.]+\))", text)
    assert found, "the README no longer says which keys every probe takes"
    return {key: ast.literal_eval(value) for key, value in re.findall(r"`(\w+)` \(([\d.]+)\)", found.group(1))}


def test_a_probe_given_only_its_kind_has_the_readmes_defaults():
    written = readme_defaults()
    assert written == {"interval": 2.0, "timeout": 1.0, "failure_threshold": 3, "success_threshold": 1,
                       "initial_delay": 0}, written
    config = parse_mesh({"services": {"s": {"command": ["x"], "port": 7005, "liveness": {"tcp": {}},
                                            "readiness": {"url": "http://127.0.0.1:{port}/"}}}})
    for probe in (config.services["s"].liveness, config.services["s"].readiness):
        assert {key: getattr(probe, key) for key in written} == written


def test_an_http_probe_given_nothing_asks_the_readmes_path_and_status_range():
    row = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `http` |"))
    path, status = re.search(r'`path` \("([^"]+)"\).*`status` \((\[[\d, ]+\])\)', row).groups()
    probe = parse_mesh({"services": {"s": {"command": ["x"], "port": 7005, "liveness": {"http": {}}}}}).services["s"]
    assert probe.liveness.http.path == path and list(probe.liveness.http.status) == ast.literal_eval(status)
    assert probe.liveness.http.headers == {}
