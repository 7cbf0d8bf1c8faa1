"""A flood of wrong login codes at the web UI: the first ones in a minute are refused (403)
and audited one by one; the rest get 429 with Retry-After and are counted, not written, so
they cannot fill the audit trail; a good code still logs in meanwhile."""

from __future__ import annotations

import http.client
import json

import pytest

from tron.services.daemon.ui.auth import REFUSALS_AUDITED

pytestmark = pytest.mark.integration


def _get(mesh, path: str) -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", mesh.port("daemon"), timeout=20)
    try:
        conn.request("GET", path)
        answer = conn.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read().decode()
    finally:
        conn.close()


def test_a_flood_of_wrong_login_codes_is_answered_429_and_counted_not_audited_one_by_one(mesh_factory):
    mesh = mesh_factory(services={"llm-sim": {"role": "llm_sim", "port": 6190}})
    mesh.up()
    said = [_get(mesh, f"/ui/login?code=wrong-code-{i:04d}-xxxxxxxx") for i in range(REFUSALS_AUDITED + 5)]
    assert [s for s, _, _ in said] == [403] * REFUSALS_AUDITED + [429] * 5, [s for s, _, _ in said]
    status, headers, body = said[-1]
    assert 1 <= int(headers["Retry-After"]) <= 60 and "too many refused logins" in json.loads(body)["error"]
    mesh.flushed()
    audited = mesh.rows("SELECT payload FROM events WHERE kind = 'audit'")
    refused = [json.loads(r["payload"]) for r in audited if json.loads(r["payload"])["what"] == "ui_login"]
    assert len(refused) == REFUSALS_AUDITED and all(r["outcome"].startswith("refused") for r in refused)
    assert all("wrong-code" not in r["payload"] for r in audited)  # never the code itself

    code, minted = mesh.http("POST", mesh.url("daemon") + "/ui/login-code", {})
    assert code == 201, minted
    status, headers, _ = _get(mesh, minted["url"].removeprefix(mesh.url("daemon")))
    assert (status, headers.get("Location")) == (303, "/ui/")  # a good code logs in through the flood
