"""Issue 15, the registry on PostgreSQL: the same mesh, ladder, drills and report with
TRON_REGISTRY_URL pointing at a throwaway server (tests/pgserver.py), every row written
once as on SQLite; one daemon per registry; a server that is not there is a clear
refusal, and a password never sits in the mesh file or a message."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration
SMALL = {"llm-sim": {"role": "llm_sim", "port": 6190},
         "root": {"role": "root", "port": 6100},
         "worker": {"role": "programmer", "port": 6130, "parent": "root"}}


def scenario(mesh, *, up: bool = True) -> dict:
    """A run through the root, a kill of the worker, a drill: what the registry says."""
    if up:
        mesh.up()
    code, run = mesh.http("POST", mesh.url("daemon") + "/runs", {"prompt": "count the rows"})
    assert code == 201, run
    done = json.loads(mesh.tron("run", "--agent", "worker", "--json", "two steps", timeout=90, check=True).stdout)
    assert mesh.rows("SELECT status FROM runs WHERE run_id = ?", (done["run_id"],)) == [{"status": "done"}]
    old = mesh.kill("worker")
    mesh.wait_replaced("worker", old)
    drill = mesh.tron("drill", "kill", "worker", "--json", timeout=120)
    assert drill.returncode == 0, drill.stdout
    report = mesh.tron("report", "--json")
    assert report.returncode == 0, report.stdout
    history = json.loads(mesh.tron("history", "--json", check=True).stdout)
    return {
        "retries": sorted((r["agent_id"], r["retry_type"], r["reason"], r["case_id"]) for r in history["retry_history"]),
        "metrics": sorted((m["scope"], m["key"] if m["scope"] in ("agent", "provider") else "-", m["restarts"])
                          for m in history["failure_metrics"]),
        "tasks": sorted((t["agent"], t["status"], t["attempt"]) for t in mesh.rows("SELECT * FROM tasks")),
        "checkpoints": mesh.rows("SELECT COUNT(*) AS n FROM checkpoints")[0]["n"],
        "sessions": sorted((s["agent"], s["status"]) for s in mesh.rows("SELECT agent, status FROM sessions")),
        "alerts": sorted((a["agent"], a["reason"]) for a in mesh.rows("SELECT agent, reason FROM alerts")),
    }


def test_the_same_mesh_writes_the_same_rows_on_postgresql_as_on_sqlite(mesh_factory, postgres):
    from concurrent.futures import ThreadPoolExecutor

    lite = mesh_factory(services=SMALL)
    lite.up()  # its ports taken before the other mesh's are chosen
    pg = mesh_factory(services=SMALL, registry_url=postgres.database())
    # two meshes of their own (home, ports, registry): the same scenario on both at once
    with ThreadPoolExecutor(2) as pool:
        sqlite_rows = pool.submit(scenario, lite, up=False)
        on_postgres = scenario(pg)
        on_sqlite = sqlite_rows.result()
    assert on_postgres == on_sqlite
    assert not (pg.home / "registry" / "registry.db").exists()  # nothing went to the file
    # every row exactly once: the unique keys hold on the server too
    dupes = pg.rows("SELECT alert_id, retry_type, hop, COUNT(*) AS n FROM retry_history "
                    "GROUP BY alert_id, retry_type, hop HAVING COUNT(*) > 1")
    assert dupes == []


def test_one_daemon_per_registry_and_clear_refusals(mesh_factory, postgres):
    url = postgres.database()
    first = mesh_factory(services={"llm-sim": {"role": "llm_sim", "port": 6190}}, registry_url=url)
    first.up()
    second = mesh_factory(services={"llm-sim": {"role": "llm_sim", "port": 6190}}, registry_url=url)
    refused = second.tron("up", "--detach")
    assert refused.returncode != 0 and "another tron daemon is writing the registry" in refused.stderr + refused.stdout
    backup = first.tron("backup")
    assert backup.returncode == 2 and "pg_dump" in backup.stderr
    nowhere = mesh_factory(services={"llm-sim": {"role": "llm_sim", "port": 6190}},
                           registry_url=f"postgresql://tron@127.0.0.1:{postgres.port + 1}/none")
    nowhere.env["PGPASSWORD"] = "s3cret-pw"  # where a password belongs (issue 20: never in the URL)
    down = nowhere.tron("up", "--detach")
    said = down.stderr + down.stdout
    assert down.returncode != 0, said
    assert "cannot reach the registry" in said or "is not usable" in said, said
    assert "s3cret-pw" not in said


def test_a_password_in_the_mesh_file_is_refused(mesh_factory):
    for url in ("postgresql://tron:pw@db/tron", "postgresql://tron@db/tron?password=pw"):
        mesh = mesh_factory(services={"llm-sim": {"role": "llm_sim", "port": 6190}})
        mesh.config.write_text(mesh.config.read_text() + f'\n[registry]\nurl = "{url}"\n')
        status = mesh.tron("status")
        assert status.returncode != 0 and "PGPASSWORD" in status.stderr, status.stderr


def test_a_password_in_tron_registry_url_is_refused_and_shown_nowhere(mesh_factory, postgres):
    """Issue 20, item 6: user:password@ or a password-ish query parameter in
    TRON_REGISTRY_URL is refused with the mesh file's message, before any connection (the
    server here is up and would have let the daemon in), by the daemon and by the CLI's
    registry verbs; the password is in no output and no file of the home."""
    url = postgres.database()  # postgresql://postgres@127.0.0.1:PORT/NAME
    for bad in (url.replace("postgres@", "postgres:s3cret-pw@"), url + "?password=s3cret-pw",
                url + "?sslmode=disable&sslpassword=s3cret-pw"):
        mesh = mesh_factory(services={"llm-sim": {"role": "llm_sim", "port": 6190}}, registry_url=bad)
        for verb in (("up", "--detach"), ("report",), ("history", "--json")):
            run = mesh.tron(*verb)
            said = run.stderr + run.stdout
            assert run.returncode == 2 and "TRON_REGISTRY_URL: the URL holds a password" in said, said
            assert "PGPASSWORD" in said and "s3cret-pw" not in said, said
        assert not [p for p in mesh.home.rglob("*") if p.is_file() and b"s3cret-pw" in p.read_bytes()]
