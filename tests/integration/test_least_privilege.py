"""Issue 21: an agent's credential speaks only for that agent.

A "compromised" agent (its own credential, read from its TRON_TOKEN_FILE as any tool it
runs could) tries what a prompt-injected model would; every call is refused with the
missing scope, nothing changes, and each refusal is in the audit log. Beats cannot be
spoofed, a UI session is audited as its login whatever the body says, tokens are named and
revoked at once, unauthenticated reads say only what a load balancer needs, and agents
written against contract v1 in another language keep working unchanged.
"""

from __future__ import annotations

import http.client
import json
import os
import pwd
import textwrap
import time
import urllib.parse

import pytest

from tests.harness import REPO, closed_by_peer, wait_for
from tests.harness import http as call

pytestmark = pytest.mark.integration
BASH_AGENT = REPO / "examples" / "bash-agent" / "agent.sh"


def credential(mesh, name: str) -> str:
    """What the agent's own TRON_TOKEN_FILE holds (a tool it runs can read it)."""
    svc = mesh.service(name)
    path = mesh.home / "run" / "creds" / f"{name}~{svc['incarnation']}"
    return path.read_text().strip()


def as_agent(mesh, cred: str, method: str, path: str, body=None) -> tuple[int, object]:
    return call(method, mesh.url("daemon") + path, body, token=cred, timeout=5)


def as_user(uid: int, port: int, path: str, token: str) -> int:
    """POST ``path`` to the daemon from a process running as ``uid`` (forked from this one and
    setuid, so no interpreter has to be found that the other user may run): the answer's status."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nothing but a socket and os._exit
        code = 0
        try:
            os.setgid(uid)
            os.setuid(uid)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", path, body=b'{"reason": "from another user"}',
                         headers={"X-Tron-Token": token, "Content-Type": "application/json"})
            code = conn.getresponse().status
        finally:
            os.write(write, str(code).encode())
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        status = int(answer.read() or 0)
    os.waitpid(pid, 0)
    return status


def audit(mesh) -> list[dict]:
    return [json.loads(r["payload"]) for r in mesh.rows("SELECT payload FROM events WHERE kind = 'audit' ORDER BY id")]


def snapshot(mesh) -> dict:
    status = mesh.status()
    _, settings = mesh.http("GET", mesh.url("daemon") + "/settings")
    _, lanes = mesh.http("GET", mesh.url("daemon") + "/lanes")
    _, tokens = mesh.http("GET", mesh.url("daemon") + "/tokens")
    return {"services": {s["name"]: (s["incarnation"], s["state"], s["paused"], s["provider"])
                         for s in status["services"]},
            "spawning": status["spawning"], "policy": settings["policy"],
            "lanes": [(x["lane"], x["state"]) for x in lanes], "tokens": tokens,
            "tasks": mesh.rows("SELECT task_id, status, lease_incarnation, progress, attempt FROM tasks ORDER BY task_id"),
            "runs": mesh.rows("SELECT run_id, status FROM runs ORDER BY run_id")}


def test_a_compromised_agent_is_refused_30_forbidden_calls_and_changes_nothing(mesh):
    run = json.loads(mesh.tron("run", "--json", "write a haiku", timeout=90, check=True).stdout)
    assert run["status"] == "done", run
    run_id, root_task = run["run_id"], f"{run['run_id']}.0"
    me, other = mesh.service("programmer-1"), mesh.service("programmer-2")
    cred = credential(mesh, "programmer-1")
    inc, inc2 = me["incarnation"], other["incarnation"]
    before = snapshot(mesh)
    fail = {"alert_id": "a-1", "task_id": root_task, "reason": "x", "case": "x", "requested_by": "programmer-1"}
    calls = [
        ("POST", "/services/programmer-2/restart", {"reason": "x"}),
        ("POST", "/services/gateway/stop", {}),
        ("POST", "/services/root/start", {}),
        ("POST", "/services/programmer-2/pause", {}),
        ("PUT", "/settings", {"policy": {"max_restarts": 9}}),
        ("POST", "/lanes/programmer/pause", {}),
        ("POST", "/spawning/pause", {}),
        ("POST", "/control/drill", {"name": "evil"}),
        ("POST", "/control/backup", None),
        ("POST", "/control/shutdown", None),
        ("POST", "/providers/anthropic/drain", {}),
        ("GET", "/events", None),
        ("GET", "/tokens", None),
        ("POST", "/tokens", {"name": "evil"}),
        ("POST", "/tokens/operator/revoke", None),
        ("POST", "/notify/test", {}),
        ("GET", "/providers", None),
        ("POST", f"/tasks/{root_task}/cancel", {"reason": "x"}),
        ("POST", f"/runs/{run_id}/budget", {"usd": 1}),
        ("POST", "/beat", {"service": "programmer-2", "incarnation": inc2, "pid": 1, "seq": 10**9}),
        ("POST", "/beat", {"service": "programmer-1", "incarnation": inc2, "pid": 1, "seq": 10**9}),
        ("POST", "/tasks/claim", {"service": "programmer-2", "incarnation": inc2}),
        ("POST", "/control/report_failure", {"service": "programmer-2", "incarnation": inc2, "reason": "x"}),
        ("POST", "/providers/acquire", {"service": "programmer-2", "incarnation": inc2, "provider": "anthropic"}),
        ("POST", "/control/restart", {"service": "programmer-2", "replaces": inc2, "alert_id": "a-1", "reason": "x",
                                      "case": "x", "requested_by": "programmer-1"}),
        ("POST", "/control/permanent_failure", {**fail, "service": "programmer-2"}),
        ("POST", "/tasks", {"task_id": "evil.1", "run_id": run_id, "agent": "architect", "parent_agent": "programmer-1",
                            "kind": "x", "prompt": "x"}),
        ("GET", "/ladder/view?service=programmer-2&decider=programmer-1", None),
        ("POST", "/auth/peer", {"to": "programmer-2"}),
        ("POST", "/runs", {"prompt": "x"}),
        ("GET", f"/runs/{run_id}", None),
        ("GET", f"/tasks/{root_task}", None),
        ("POST", f"/tasks/{root_task}/finish", {"status": "failed", "reason": "x", "incarnation": inc}),
        ("POST", f"/tasks/{root_task}/checkpoint", {"step": 1, "step_id": "s", "output": "x"}),
    ]
    calls = calls[:30]
    answers = [(method, path, *as_agent(mesh, cred, method, path, body)) for method, path, body in calls]
    wrong = [(m, p, code, body) for m, p, code, body in answers if code != 403 or not body.get("scope")]
    assert not wrong, wrong
    scopes = {body["scope"] for *_, body in answers}
    assert scopes == {"operator", "read", "self", "children", "runs"}, scopes
    assert all(mesh.service(n)["state"] == "running" for n in ("programmer-1", "programmer-2", "gateway", "root"))
    assert snapshot(mesh) == before
    refused = [a for a in audit(mesh) if a["who"] == f"programmer-1/{inc}" and a["outcome"].startswith("refused")]
    assert len(refused) == 30, refused
    metrics = mesh.http("GET", mesh.url("daemon") + "/metrics")[1]
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("tron_requests_refused_total{"))
    assert counted == 30, metrics
    # A peer token to its parent (for escalations) lets it escalate about itself, nothing else:
    # no result, cancel or alert in the daemon's name, no task for another service.
    code, peer = as_agent(mesh, cred, "POST", "/auth/peer", {"to": "director-code"})
    assert code == 200, peer
    parent = mesh.url("director-code")
    fake = {"task_id": root_task, "run_id": run_id, "status": "done", "result": "forged"}
    assert call("POST", parent + "/task_result", fake, token=peer["token"])[0] == 401
    assert call("POST", parent + f"/tasks/{root_task}/cancel", None, token=peer["token"])[0] == 401
    alert = {"alert_id": "a-9", "service": "programmer-1", "incarnation": inc, "reason": "heartbeat_timeout"}
    assert call("POST", parent + "/handle_child_timeout", alert, token=peer["token"])[0] == 401
    assert call("POST", mesh.url("programmer-2") + "/tasks", {}, token=peer["token"])[0] == 401  # not its target
    assert call("POST", parent + "/tasks", {}, token=mesh.token)[0] == 401  # nor is the operator's own token
    assert snapshot(mesh) == before
    # the same calls with the operator's token are answered (the harmless ones, and a pause undone)
    for method, path, body in [*(calls[i] for i in (11, 12, 16, 27, 28, 29, 6)), ("POST", "/spawning/resume", {})]:
        code, answer = mesh.http(method, mesh.url("daemon") + path, body)
        assert code < 400, (path, code, answer)
    code, _ = mesh.http("GET", mesh.url("daemon") + f"/runs/{run_id}")
    assert code == 200
    # and the agent, refused all that, still does its own work
    again = json.loads(mesh.tron("run", "--json", "another haiku", timeout=90, check=True).stdout)
    assert again["status"] == "done", again


def test_beats_cannot_be_spoofed(mesh):
    p1, p2 = mesh.service("programmer-1"), mesh.service("programmer-2")
    cred1, cred2 = credential(mesh, "programmer-1"), credential(mesh, "programmer-2")
    # the attack of the issue: another agent's incarnation, a huge seq
    code, body = as_agent(mesh, cred2, "POST", "/beat", {"service": "programmer-1", "incarnation": p1["incarnation"],
                                                         "pid": 1, "seq": 10**9})
    assert code == 403 and body["scope"] == "self", body
    # its own, with a seq far ahead: not the next one, refused, and the real beats go on
    code, body = as_agent(mesh, cred1, "POST", "/beat", {"service": "programmer-1", "incarnation": p1["incarnation"],
                                                         "pid": 1, "seq": 10**9})
    assert code == 409 and body["verdict"] == "seq_out_of_order", body
    code, body = as_agent(mesh, cred1, "POST", "/beat", {"service": "programmer-1", "incarnation": "i-nope",
                                                         "pid": 1, "seq": 1})
    assert code == 403, body  # an incarnation that is not the credential's
    # A task leased to programmer-1 and running (a slow provider), named in programmer-2's beat:
    # refused, and neither its lease nor its progress moves.
    sim = mesh.url("llm-sim") + "/sim/faults/anthropic"
    assert mesh.http("PUT", sim, {"kind": "latency", "latency_ms": 3000})[0] == 200
    code, run = mesh.http("POST", mesh.url("daemon") + "/runs", {"prompt": "x"})
    task_id = f"{run['run_id']}.0"
    code, _ = mesh.http("POST", mesh.url("daemon") + "/tasks", {"task_id": task_id, "run_id": run["run_id"],
                                                               "agent": "programmer-1", "parent_agent": "operator",
                                                               "kind": "run", "prompt": "a slow one"})
    assert code == 201
    query = "SELECT lease_incarnation, progress, status FROM tasks WHERE task_id = ?"
    row = wait_for(lambda: [r for r in mesh.rows(query, (task_id,)) if r["status"] == "running"
                            and r["lease_incarnation"] == p1["incarnation"]], 30, "programmer-1 at work")
    code, body = as_agent(mesh, cred2, "POST", "/beat", {"service": "programmer-2", "incarnation": p2["incarnation"],
                                                         "pid": 1, "seq": 10**6, "task_id": task_id,
                                                         "progress": "hijacked"})
    assert code == 409 and body["verdict"] == "foreign_task", body
    assert mesh.rows(query, (task_id,)) == row
    assert mesh.http("DELETE", sim)[0] == 200
    wait_for(lambda: mesh.rows(query, (task_id,))[0]["status"] == "done", 60, "programmer-1's task, done")
    # Nobody is restarted: both keep beating under their incarnation for well past the beat timeout.
    timeout = mesh.policy["heartbeat_interval"] * mesh.policy["miss_threshold"]
    start = time.monotonic()
    while time.monotonic() - start < 2 * timeout:
        for name, svc in (("programmer-1", p1), ("programmer-2", p2)):
            now = mesh.service(name)
            assert now["incarnation"] == svc["incarnation"] and now["state"] == "running", now
        time.sleep(0.1)
    assert mesh.rows("SELECT reason FROM alerts") == []


def test_tokens_viewers_revocation_and_an_incarnations_credential_dying_with_it(mesh):
    daemon = mesh.url("daemon")
    created = mesh.tron("token", "create", "ci", check=True).stdout.strip()
    viewer = mesh.tron("token", "create", "board", "--viewer", check=True).stdout.strip()
    listed = mesh.tron("token", "list", "--json", check=True).stdout
    assert {(t["name"], t["role"]) for t in json.loads(listed)} == {("operator", "operator"), ("ci", "operator"),
                                                                     ("board", "viewer")}
    assert created not in (mesh.home / "run" / "tokens.json").read_text()
    assert call("POST", daemon + "/services/director-docs/pause", {"reason": "ci"}, token=created)[0] < 300
    assert call("POST", daemon + "/services/director-docs/resume", {"reason": "ci"}, token=created)[0] < 300
    assert [a["who"] for a in audit(mesh)][-2:] == ["token:ci", "token:ci"]
    # The row names the Unix user behind the connection, as the kernel says: a copied token acts
    # as its owner, but cannot hide who used it (a body's "actor" is never taken, see below).
    me = f"{pwd.getpwuid(os.getuid()).pw_name} (uid {os.getuid()})"
    assert [a.get("unix_user") for a in audit(mesh)][-2:] == [me, me]
    if os.getuid() == 0:
        assert as_user(65534, mesh.port("daemon"), "/services/director-docs/pause", created) == 200
        row = audit(mesh)[-1]
        assert (row["who"], row["what"], row["unix_user"]) == ("token:ci", "pause", "nobody (uid 65534)"), row
        assert call("POST", daemon + "/services/director-docs/resume", {"reason": "ci"}, token=created)[0] < 300
    code, status = call("GET", daemon + "/status", token=viewer)
    assert code == 200 and status["services"][0]["pid"], status  # a viewer sees everything...
    code, body = call("POST", daemon + "/services/director-docs/pause", {}, token=viewer)
    assert code == 403 and body["scope"] == "operator", body  # ...and changes nothing
    assert mesh.tron("token", "revoke", "ci", check=True).returncode == 0
    assert call("GET", daemon + "/events", token=created)[0] == 401  # at once, no restart
    assert mesh.tron("token", "revoke", "nobody").returncode == 2
    # an incarnation's credential stops working when it is replaced, and its file goes
    old = mesh.service("programmer-2")
    cred = credential(mesh, "programmer-2")
    path = mesh.home / "run" / "creds" / f"programmer-2~{old['incarnation']}"
    mesh.tron("restart", "programmer-2", "--wait", check=True)
    wait_for(lambda: not path.exists(), 10, "the replaced incarnation's credential file gone (a moment after)")
    code, _ = call("POST", daemon + "/beat", {"service": "programmer-2", "incarnation": old["incarnation"], "pid": 1,
                                             "seq": 10**6}, token=cred)
    assert code == 401
    # the operator's token is in no service's credential file
    assert all(p.read_text() != mesh.token for p in (mesh.home / "run" / "creds").iterdir())


def test_what_is_public_without_a_credential(mesh_factory):
    mesh = mesh_factory(services={"bash-agent": {"command": ["bash", str(BASH_AGENT)], "port": 6160,
                                                 "heartbeat": True}})
    text = mesh.config.read_text().replace("[mesh]\n", "[mesh]\nmetrics_public = false\n")
    mesh.config.write_text(text)
    mesh.up()
    daemon = mesh.url("daemon")
    code, public = call("GET", daemon + "/status")
    assert code == 200 and public["services"] == [{"name": "bash-agent", "state": "running"}], public
    flat = json.dumps(public)
    svc = mesh.service("bash-agent")
    assert svc["incarnation"] not in flat and str(svc["pid"]) not in flat and "chain" not in flat
    code, health = call("GET", daemon + "/health")
    assert code == 200 and "pid" not in health
    assert call("GET", daemon + "/health", token=mesh.token)[1]["pid"]
    assert call("GET", daemon + "/metrics")[0] == 401  # metrics_public = false
    assert call("GET", daemon + "/metrics", token=mesh.token)[0] == 200
    for path in ("/events", "/providers", "/tokens"):
        assert call("GET", daemon + path)[0] == 401, path


PERL_AGENT = r'''
use strict; use warnings; use HTTP::Tiny; use JSON::PP;
# Contract v1 in Perl: beats, claims, a checkpoint, a finish, with the file's credential.
open(my $fh, '<', $ENV{TRON_TOKEN_FILE}) or die "no token file"; my $token = <$fh>; close $fh; chomp $token;
my $url = $ENV{TRON_DAEMON_URL}; my $me = $ENV{TRON_SERVICE}; my $inc = $ENV{TRON_INCARNATION};
my $http = HTTP::Tiny->new(timeout => 2, default_headers => {'X-Tron-Token' => $token,
                                                             'Content-Type' => 'application/json'});
my $seq = 0; my $task = undef;
sub api { my ($path, $body) = @_; return $http->post("$url$path", {content => encode_json($body)}); }
sub beat {
    my %b = (service => $me, incarnation => $inc, pid => $$, seq => $seq++);
    $b{task_id} = $task if defined $task;
    my $r = api('/beat', \%b);
    if ($r->{status} == 409 && decode_json($r->{content})->{verdict} eq 'stale_incarnation') { exit 0; }
}
while (1) {
    beat();
    my $r = api('/tasks/claim', {service => $me, incarnation => $inc});
    if ($r->{status} == 200) {
        my $t = decode_json($r->{content}); $task = $t->{task_id};
        beat();
        api("/tasks/$task/checkpoint", {step => 1, step_id => 'perl-1', output => "perl: $t->{prompt}"});
        api("/tasks/$task/finish", {status => 'done', result => "perl: $t->{prompt}", attempt => $t->{attempt}});
        $task = undef;
    }
    select(undef, undef, undef, 0.2);
}
'''


def test_contract_v1_agents_in_bash_and_perl_keep_working(mesh_factory, tmp_path):
    perl = tmp_path / "agent.pl"
    perl.write_text(textwrap.dedent(PERL_AGENT))
    services = {"bash-agent": {"command": ["bash", str(BASH_AGENT)], "port": 6160, "heartbeat": True,
                               "env": {"STEP_SECONDS": "0.1"}},
                "perl-agent": {"command": ["perl", str(perl)], "port": 6161, "heartbeat": True}}
    mesh = mesh_factory(services=services)
    mesh.up()
    for name, want in (("bash-agent", "step 3 of: hello"), ("perl-agent", "perl: hello")):
        wait_for(lambda n=name: mesh.service(n)["last_beat_age"] is not None, 10, f"{name}'s beats")
        out = mesh.tron("run", "--agent", name, "--json", "hello", timeout=60, check=True)
        run = json.loads(out.stdout)
        assert run["status"] == "done" and run["result"] == want, run
        # the file it was handed is its own credential, not the operator's token
        assert credential(mesh, name) != mesh.token


def _request(port: int, method: str, path: str, *, body=None, headers=None) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=json.dumps(body) if body is not None else None,
                 headers={"Content-Type": "application/json", **(headers or {})})
    return conn.getresponse()


def test_a_ui_action_is_audited_as_the_sessions_login_whatever_the_body_says(mesh_factory):
    mesh = mesh_factory(services={"bash-agent": {"command": ["bash", str(BASH_AGENT)], "port": 6160,
                                                 "heartbeat": True}})
    mesh.up()
    port = mesh.port("daemon")

    def session(token: str, actor: str) -> tuple[str, str, str]:
        code, answer = call("POST", mesh.url("daemon") + "/ui/login-code", {"actor": actor}, token=token)
        assert code == 201, answer
        resp = _request(port, "GET", urllib.parse.urlsplit(answer["url"]).path + "?code=" + answer["code"])
        cookie = resp.getheader("Set-Cookie").split(";", 1)[0]
        page = _request(port, "GET", "/ui/", headers={"Cookie": cookie}).read().decode()
        return cookie, page.split('name="csrf-token" content="', 1)[1].split('"', 1)[0], page

    cookie, csrf, _ = session(mesh.token, "alice@ui")
    resp = _request(port, "POST", "/services/bash-agent/pause", body={"reason": "ui", "actor": "forged@cli"},
                    headers={"Cookie": cookie, "X-CSRF-Token": csrf})
    assert resp.status < 300, resp.read()
    last = audit(mesh)[-1]
    assert (last["what"], last["who"]) == ("pause", "alice@ui"), last
    me = f"{pwd.getpwuid(os.getuid()).pw_name} (uid {os.getuid()})"  # whose browser: the kernel says
    assert last["unix_user"] == me and [a.get("unix_user") for a in audit(mesh) if a["what"] == "ui_login"] == [me]
    # A viewer's token opens a read-only session: it shows the mesh and changes nothing.
    viewer = mesh.tron("token", "create", "wall", "--viewer", check=True).stdout.strip()
    cookie, csrf, page = session(viewer, "wall@ui")
    assert "bash-agent" in page and "(read-only)" in page
    resp = _request(port, "POST", "/services/bash-agent/resume", body={"reason": "ui"},
                    headers={"Cookie": cookie, "X-CSRF-Token": csrf})
    assert resp.status == 403 and json.loads(resp.read())["scope"] == "operator"
    assert mesh.service("bash-agent")["paused"] is True
    resp = _request(port, "GET", "/status", headers={"Cookie": cookie, "X-CSRF-Token": csrf})
    assert resp.status == 200 and json.loads(resp.read())["services"][0]["pid"]
    # A named operator token's session acts as that token, whatever name the login asked for,
    # and dies with the token: revoked, its session (and the viewer's) is refused from then on.
    ops = mesh.tron("token", "create", "ops", check=True).stdout.strip()
    ops_cookie, ops_csrf, _ = session(ops, "root")
    resp = _request(port, "POST", "/services/bash-agent/resume", body={"reason": "ui"},
                    headers={"Cookie": ops_cookie, "X-CSRF-Token": ops_csrf})
    assert resp.status < 300, resp.read()
    last = audit(mesh)[-1]
    assert (last["what"], last["who"]) == ("resume", "token:ops@ui"), last
    for name in ("ops", "wall"):
        mesh.tron("token", "revoke", name, check=True)
    resp = _request(port, "POST", "/services/bash-agent/pause", body={"reason": "ui"},
                    headers={"Cookie": ops_cookie, "X-CSRF-Token": ops_csrf})
    assert resp.status == 401, resp.read()
    resp = _request(port, "GET", "/status", headers={"Cookie": cookie})  # what an anonymous caller sees
    assert resp.status == 200 and "pid" not in json.loads(resp.read())["services"][0]
    assert mesh.service("bash-agent")["paused"] is False


def test_a_parent_decides_only_about_its_own_descendants_tasks_and_only_in_its_own_name(mesh):
    """A director's credential names its own child beside another subtree's task: the top's
    decisions (switch, park, fail) and a restart with the task are refused, as is a decision
    in another agent's name; the victim's task and run are untouched, and no row is written."""
    run = json.loads(mesh.tron("run", "--json", "write a haiku", timeout=90, check=True).stdout)
    assert run["status"] == "done", run
    code, made = mesh.http("POST", mesh.url("daemon") + "/runs", {"prompt": "victim"})
    assert code in (200, 201), made
    victim_run = made["run_id"]
    sim = mesh.url("llm-sim")
    for provider in ("anthropic", "ollama"):  # the victim task stays live: programmer-1 waits on its call
        assert mesh.http("PUT", sim + f"/sim/faults/{provider}", {"kind": "latency", "latency_ms": 60000})[0] == 200
    victim = {"task_id": f"{victim_run}.v", "run_id": victim_run, "agent": "programmer-1",
              "parent_agent": "director-code", "kind": "code", "prompt": "x"}
    code, answer = as_agent(mesh, credential(mesh, "director-code"), "POST", "/tasks", victim)
    assert code in (200, 201), answer
    wait_for(lambda: mesh.service("programmer-1").get("task") == victim["task_id"], 20,
             "programmer-1 working on the victim task")
    cred = credential(mesh, "director-docs")
    inc2 = mesh.service("programmer-2")["incarnation"]
    task = {"task_id": victim["task_id"], "run_id": victim_run}
    before = snapshot(mesh)
    rows = "SELECT COUNT(*) AS n FROM retry_history"
    retries = mesh.rows(rows)[0]["n"]
    step = {"service": "programmer-2", "alert_id": "a-evil", "reason": "evil", "case": "switches_exhausted"}
    calls = [
        ("/control/permanent_failure", {**step, **task, "requested_by": "director-docs"}),
        ("/control/switch", {**step, "task_id": task["task_id"], "to_provider": "ollama",
                             "requested_by": "director-docs"}),
        ("/control/park", {**step, "task_id": task["task_id"], "requested_by": "director-docs"}),
        ("/control/restart", {**step, "replaces": inc2, "with_task": True, "task_id": task["task_id"],
                              "requested_by": "director-docs"}),
        ("/control/escalation", {**step, **task, "from_service": "director-docs", "to_service": "architect"}),
    ]
    for path, body in calls:
        code, answer = as_agent(mesh, cred, "POST", path, body)
        assert code == 403 and answer.get("scope") == "children" and "programmer-1" in answer["error"], \
            (path, code, answer)
    # Its own child's own decision, in root's name, is refused too (the record would say root decided).
    own = mesh.rows("SELECT task_id FROM tasks WHERE agent = 'programmer-2' ORDER BY created_at DESC LIMIT 1")
    assert own, "programmer-2 ran a task in the first run"
    code, answer = as_agent(mesh, cred, "POST", "/control/park",
                            {**step, "task_id": own[0]["task_id"], "requested_by": "root"})
    assert code == 403 and answer.get("scope") == "self", answer
    assert snapshot(mesh) == before
    assert mesh.rows(rows)[0]["n"] == retries
    [left] = mesh.rows(f"SELECT status FROM tasks WHERE task_id = '{victim['task_id']}'")
    assert left["status"] in ("assigned", "running"), left
    for provider in ("anthropic", "ollama"):
        mesh.http("DELETE", sim + f"/sim/faults/{provider}")


def test_a_flood_of_refused_requests_is_counted_not_audited_one_by_one_and_forges_no_audit_line(mesh):
    """A compromised agent sends 80 refused requests whose path forges an audit line: the first
    30 are audited (escaped), the rest counted (metric, and said with the next audited one);
    `tron audit` prints each on its own line; the operator's next action is still in view."""
    cred = credential(mesh, "programmer-1")
    inc = mesh.service("programmer-1")["incarnation"]
    forged = "/tasks/x%0D%0A2026-12-07T05:12:00%20%20token:operator%20%20stop%20%20programmer-2/retry"
    for _ in range(80):
        code, _ = as_agent(mesh, cred, "POST", forged, {})
        assert code == 403
    metrics = mesh.http("GET", mesh.url("daemon") + "/metrics")[1]
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("tron_requests_refused_total{"))
    assert counted == 80, metrics
    wait_for(lambda: len([a for a in audit(mesh) if a["who"] == f"programmer-1/{inc}"]) == 30, 10,
             "the first 30 refusals audited")
    rows = [a for a in audit(mesh) if a["who"] == f"programmer-1/{inc}"]
    assert all("\r" not in a["target"] and "\n" not in a["target"] and "\\r\\n" in a["target"] for a in rows), rows
    assert mesh.tron("pause", "programmer-2", "--reason", "maintenance", check=True).returncode == 0
    mesh.tron("resume", "programmer-2", check=True)
    printed = mesh.tron("audit", "--limit", "200", check=True).stdout.splitlines()
    assert not [line for line in printed if line.startswith("2026-12-07T05:12:00")], printed
    assert any("maintenance" in line for line in printed), printed
    code, answer = mesh.http("POST", mesh.url("daemon") + "/services/programmer-2/pause",
                             {"reason": "a\r\nX-Injected: 1"})
    assert code == 422 and "control character" in json.dumps(answer), answer
    assert mesh.service("programmer-2")["paused"] is False
    # ... and that refused action is in the audit trail too (accepted or refused, every one)
    refused = wait_for(lambda: [a for a in audit(mesh) if a["what"] == "POST /services/programmer-2/pause"
                                and a["outcome"].startswith("refused (422)")], 10, "the refused pause audited")
    assert refused[0]["who"] == "token:operator" and "control character" in refused[0]["outcome"], refused


def test_connections_held_open_by_anyone_cannot_make_the_daemon_or_an_agent_unreachable(mesh):
    """A local user with no token opens more connections than the daemon keeps (its cap, a
    quarter of its descriptors, at most 4096), sending nothing or half a request line: the
    oldest idle ones are closed to make room, so `tron status`, a kill's recovery and the
    agents' beats go on, and /status and /metrics say how many were closed."""
    import socket

    http = mesh.status()["http"]
    cap = http["cap"]
    assert http["idle_timeout"] == 30.0 and cap >= 64
    held: list[socket.socket] = []
    try:
        for i in range(cap + 300):
            s = socket.create_connection(("127.0.0.1", mesh.port("daemon")), timeout=10)
            if i % 3 == 0:
                s.sendall(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never ended
            held.append(s)
        assert mesh.tron("status", timeout=30).returncode == 0
        old = mesh.kill("programmer-1")
        try:
            mesh.wait_replaced("programmer-1", old)  # its first beat reached the daemon
        except AssertionError as err:  # what the daemon says of it, and its last lines
            log = (mesh.home / "logs" / "daemon.log").read_text().splitlines()
            raise AssertionError(f"{err}; the daemon says {mesh.service('programmer-1')}; its log ends: "
                                 + "\n".join(log[-40:])) from None
        http = mesh.status()["http"]
        assert http["evicted"] >= 300 and http["open"] <= cap + 10, http
        _, metrics = mesh.http("GET", mesh.url("daemon") + "/metrics")
        assert "tron_http_connections_evicted_total" in str(metrics)
        assert closed_by_peer(held[:200], 10) == 200  # the oldest: closed by the daemon, not left hanging
    finally:
        for s in held:
            s.close()
    log = (mesh.home / "logs" / "daemon.log").read_text()
    assert "idle ones closed to make room" in log
