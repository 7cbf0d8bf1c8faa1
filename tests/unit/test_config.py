import pytest

from tron.common.config import ConfigError, load_mesh, parse_mesh, port_offset_from_env


def base(**services):
    return {"services": services or {"a": {"role": "root", "port": 7001},
                                     "b": {"role": "programmer", "port": 7002, "parent": "a"}}}


def test_default_mesh_loads_with_the_design_ports():
    cfg = load_mesh(port_offset=0)
    ports = {n: s.port for n, s in cfg.services.items()}
    assert ports == {"llm-sim": 6190, "gateway": 6120, "root": 6100, "architect": 6110, "director-code": 6111,
                     "director-docs": 6112, "programmer-1": 6130, "programmer-2": 6131}
    assert cfg.mesh.daemon_port == 6109
    assert cfg.ancestors("programmer-1") == ["director-code", "architect", "root", "daemon"]
    assert cfg.start_order().index("architect") < cfg.start_order().index("director-code")
    assert cfg.policy.heartbeat_interval == 1 and cfg.policy.miss_threshold == 3 and cfg.policy.max_restarts == 3


def test_port_offset_shifts_every_port():
    cfg = load_mesh(port_offset=1000)
    assert cfg.mesh.daemon_port == 7109 and cfg.services["root"].port == 7100


@pytest.mark.parametrize("data,message", [
    ({"services": {"a": {"role": "root", "port": 7001, "prot": 1}}}, "services.a.prot: unknown key"),
    ({"policy": {"max_restart": 3}, **base()}, "policy.max_restart: unknown key"),
    ({"services": {"a": {"role": "root", "port": 7001}, "b": {"role": "root", "port": 7001}}},
     "services.b.port: port 7001 is already used by services.a.port"),
    ({"services": {"a": {"role": "root", "port": 6109}}}, "port 6109 is already used by mesh.daemon_port"),
    ({"services": {"a": {"role": "root", "port": 7001, "parent": "b"},
                   "b": {"role": "root", "port": 7002, "parent": "a"}}}, "cycle in the parent tree"),
    ({"services": {"a": {"role": "root", "port": 7001, "parent": "nobody"}}}, "services.a.parent: no service named"),
    ({"services": {"a": {"role": "wizard", "port": 7001}}}, "role 'wizard' is not one of"),
    ({"services": {"a": {"role": "root", "port": 70000}}}, "services.a.port"),
    ({"services": {"daemon": {"role": "root", "port": 7001}}}, "the name 'daemon' is reserved"),
    # A name reaches paths, cgroups, the wire's NAME_PATTERN and the web UI's URLs: "/" went
    # outside the home, "<" had no page.
    ({"services": {"../../tmp/x": {"command": ["x"], "port": 7001}}}, "services.../../tmp/x: a service name is"),
    ({"services": {"x<img src=x>": {"command": ["x"], "port": 7001}}}, "services.x<img src=x>: a service name is"),
    ({"services": {"-x": {"command": ["x"], "port": 7001}}}, "services.-x: a service name is"),
    ({"services": {"n" * 65: {"command": ["x"], "port": 7001}}}, "a service name is"),
    ({"policy": {"heartbeat_interval": 0}, **base()}, "policy.heartbeat_interval"),
    # A section that is no table: once an AttributeError or a TypeError, not a message naming it.
    ({"mesh": 3, **base()}, "mesh: Input should be a valid dictionary"),
    ({"services": 3}, "services: Input should be a valid dictionary"),
    ({"policy": 3, "ladder": {"max_restarts": 2}, **base()}, "[policy] must be a table"),
])
def test_bad_config_is_rejected_naming_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        parse_mesh(data, source="mesh.toml")
    assert message in str(err.value)
    assert str(err.value).startswith("mesh.toml: ")


def test_command_service_with_liveness_probe():
    cfg = parse_mesh({"services": {"web": {"command": ["{python}", "-m", "http.server", "{port}"], "port": 7005,
                                           "liveness": {"url": "http://127.0.0.1:{port}/", "failure_threshold": 2}}}})
    spec = cfg.services["web"]
    assert not spec.is_agent and spec.liveness.kind == "http"  # the old shorthand still works
    assert spec.liveness.http.url == "http://127.0.0.1:{port}/" and spec.liveness.failure_threshold == 2
    assert spec.first_probe is spec.liveness
    assert spec.argv()[2:] == ["http.server", "7005"]


@pytest.mark.parametrize("probe,kind", [
    ({"tcp": {"send": "PING\r\n", "expect": "+PONG"}}, "tcp"),
    ({"exec": {"command": ["pg_isready", "-p", "{port}"]}, "interval": 1.0}, "exec"),
    ({"http": {"path": "/healthz", "status": [200, 204]}}, "http"),
])
def test_probes_of_every_kind(probe, kind):
    cfg = parse_mesh({"services": {"s": {"command": ["x"], "port": 7005, "readiness": probe, "startup": probe}}})
    assert cfg.services["s"].readiness.kind == kind and cfg.services["s"].first_probe.kind == kind


@pytest.mark.parametrize("extra,message", [
    ({"liveness": {"interval": 1.0}}, "exactly one of http, tcp, exec, grpc (this one has none)"),
    ({"liveness": {"url": "http://x/", "tcp": {}}}, "exactly one of http, tcp, exec"),
    ({"stop_signal": "SIGWHATEVER"}, "services.s.stop_signal"),
    ({"user": "no-such-user-here"}, "no such user 'no-such-user-here'"),
    ({"depends_on": {"ghost": "ready"}}, "services.s.depends_on: no service named 'ghost'"),
    ({"depends_on": {"s": "started"}}, "cycle (s -> s)"),
    ({"depends_on": {"t": "healthy"}}, "services.s.depends_on.t"),
    # a template with an unknown {placeholder} or a stray brace: at load, not a start that hangs
    ({"command": ["sh", "-c", "echo ${HOME}"]}, "command[2]: unknown placeholder {HOME}"),
    ({"env": {"A": "{nope}"}}, "env.A: unknown placeholder {nope}"),
    ({"cwd": "{state"}, "cwd: expected '}' before end of string"),
    ({"liveness": {"exec": {"command": ["check", "{prot}"]}}}, "liveness.exec.command[1]: unknown placeholder {prot}"),
    # what execve cannot take: once accepted, "applied", then spawn_failed over and over
    ({"env": {"FOO": "a\0b"}}, "env.FOO: a NUL character cannot be passed to a program"),
    ({"command": ["x", "a\0b"]}, "command[1]: a NUL character"),
    ({"cwd": "/tmp\0x"}, "cwd: a NUL character"),
    ({"env": {"BAD=KEY": "x"}}, "env: 'BAD=KEY' is no environment variable name"),
    ({"env": {"": "x"}}, "env: '' is no environment variable name"),
])
def test_bad_process_options_are_refused_naming_the_key(extra, message):
    data = {"services": {"s": {"command": ["x"], "port": 7005, **extra}, "t": {"command": ["y"], "port": 7006}}}
    with pytest.raises(ConfigError) as err:
        parse_mesh(data, source="mesh.toml")
    assert message in str(err.value)


def test_dependencies_start_first():
    cfg = parse_mesh({"services": {
        "app": {"command": ["a"], "port": 7001, "depends_on": {"db": "ready", "cache": "started"}},
        "cache": {"command": ["c"], "port": 7002},
        "db": {"command": ["d"], "port": 7003}}})
    order = cfg.start_order()
    assert order.index("db") < order.index("app") and order.index("cache") < order.index("app")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_mesh(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[services\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_mesh(bad)


@pytest.mark.parametrize("raw,ok", [("0", True), ("1000", True), ("-40", True), ("abc", False), ("", True)])
def test_port_offset_env(raw, ok):
    if ok:
        assert port_offset_from_env({"TRON_PORT_OFFSET": raw}) == int(raw or 0)
    else:
        with pytest.raises(ConfigError, match="TRON_PORT_OFFSET"):
            port_offset_from_env({"TRON_PORT_OFFSET": raw})


def test_any_offset_is_accepted_while_every_port_fits():
    cfg = load_mesh(port_offset=57300)  # the highest port becomes 63490
    assert cfg.services["llm-sim"].port == 63490
    with pytest.raises(ConfigError) as err:
        load_mesh(port_offset=59400)
    assert "moves services.llm-sim.port to 65590, above 65535" in str(err.value)
    assert "the largest offset this mesh allows is 59345" in str(err.value)
    with pytest.raises(ConfigError, match="moves services.root.port to 0, below 1"):
        load_mesh(port_offset=-6100)


def test_the_provider_chain_must_hold_the_default():
    with pytest.raises(ConfigError, match="providers.default: 'ollama' is not in providers.chain"):
        parse_mesh({**base(), "providers": {"default": "ollama", "chain": ["anthropic"]}})
    cfg = parse_mesh({**base(), "providers": {"chain": ["ollama", "anthropic"], "default": "ollama"}})
    assert cfg.providers.chain == ["ollama", "anthropic"]


def test_literal_braces_are_written_twice_and_known_placeholders_pass():
    cfg = parse_mesh({"services": {"s": {"command": ["sh", "-c", "echo ${{HOME}} {port} {state}"], "port": 7005,
                                         "env": {"A": "{name}@{home}"}, "cwd": "{config_dir}"}}})
    assert cfg.services["s"].command[2] == "echo ${{HOME}} {port} {state}"


def test_a_ladder_table_is_the_ladders_part_of_the_policy():
    from tron.common.config import ConfigError, parse_mesh

    services = {"gateway": {"role": "gateway", "port": 6120}}
    config = parse_mesh({"ladder": {"ask_operator": True, "operator_timeout": 600}, "services": services})
    assert (config.policy.ask_operator, config.policy.operator_timeout) == (True, 600.0)
    with pytest.raises(ConfigError, match="ladder.max_restarts is also set in \\[policy\\]"):
        parse_mesh({"ladder": {"max_restarts": 2}, "policy": {"max_restarts": 3}, "services": services})
    with pytest.raises(ConfigError, match="ask_opertor: unknown key"):
        parse_mesh({"ladder": {"ask_opertor": True}, "services": services})


# Issue 20, item 4: the mesh file's [policy] is refused as PUT /settings is (one model):
# strict types, finite, bounded above, the message naming the key.
@pytest.mark.parametrize("policy,message", [
    ({"backoff_factor": 1e308}, "policy.backoff_factor: Input should be less than or equal to 10"),
    ({"task_timeout": "600"}, "policy.task_timeout: Input should be a valid number"),
    ({"task_timeout": float("inf")}, "policy.task_timeout: Input should be a finite number"),
    ({"progress_timeout": float("nan")}, "policy.progress_timeout: Input should be a finite number"),
    ({"stop_grace": False}, "policy.stop_grace: Input should be a valid number"),
    ({"max_provider_switches": 2.0}, "policy.max_provider_switches: Input should be a valid integer"),
    ({"ask_operator": "yes"}, "policy.ask_operator: Input should be a valid boolean"),
    ({"restart_window": 1e9}, "policy.restart_window: Input should be less than or equal to 604800"),
    ({"start_timeout": 3601}, "policy.start_timeout: Input should be less than or equal to 3600"),
])
def test_a_policy_number_of_the_wrong_type_or_out_of_bounds_is_refused_naming_the_key(policy, message):
    with pytest.raises(ConfigError) as err:
        parse_mesh({"policy": policy, **base()}, source="mesh.toml")
    assert str(err.value) == f"mesh.toml: {message}"
    with pytest.raises(ConfigError) as err:  # [ladder] is the same model
        parse_mesh({"ladder": policy, **base()}, source="mesh.toml")
    assert str(err.value) == f"mesh.toml: {message}"


def test_a_mesh_file_with_inf_in_its_policy_is_refused(tmp_path):
    path = tmp_path / "mesh.toml"
    path.write_text('[policy]\nbackoff_max = inf\n[services.a]\nrole = "root"\nport = 7001\n')
    with pytest.raises(ConfigError) as err:
        load_mesh(path, port_offset=0)
    assert str(err.value) == f"{path}: policy.backoff_max: Input should be a finite number"


def test_the_policy_at_its_bounds_loads():
    cfg = parse_mesh({"policy": {"backoff_factor": 10, "task_timeout": 604800, "backoff_max": 86400.0,
                                 "max_restarts": 100, "lane_trip_count": 1000}, **base()})
    assert (cfg.policy.backoff_factor, cfg.policy.task_timeout) == (10.0, 604800.0)


@pytest.mark.parametrize("checks, message", [
    ({"programer": {"refusal": False}},
     "checks.programer: no agent has the role 'programer' (roles here: programmer, root, default; "),
    # a class of your own has the role agent; this mesh has none
    ({"agent": {"repeat_limit": 0}}, "checks.agent: no agent has the role 'agent' (roles here: programmer, root, default; "),
    ({"programmer": {"repeat_limt": 2}}, "checks.programmer.repeat_limt: unknown key"),
    ({"default": {"refusal": "maybe"}}, "checks.default.refusal: Input should be a valid boolean"),
    ({"programmer": {"repeat_limit": -1}}, "checks.programmer.repeat_limit: Input should be greater than or equal to 0"),
])
def test_a_checks_table_for_no_role_or_with_an_unknown_key_is_refused_naming_it(checks, message):
    with pytest.raises(ConfigError) as err:
        parse_mesh({"checks": checks, **base()}, source="mesh.toml")
    assert str(err.value).startswith(f"mesh.toml: {message}")


def test_a_checks_table_for_a_programs_role_is_refused_and_one_per_agent_role_loads():
    # A program never calls an LLM through Tron: its role (command) takes no [checks].
    services = {"web": {"command": ["true"], "port": 7003}}
    with pytest.raises(ConfigError, match="checks.command: no agent has the role 'command'"):
        parse_mesh({"checks": {"command": {}}, **base(**base()["services"], **services)})
    cfg = parse_mesh({"checks": {"root": {"refusal": False}, "programmer": {"max_tokens": True}, "default": {},
                                 "agent": {"repeat_limit": 1}},
                      **base(**base()["services"], **services, mine={"agent": "mine.m:Mine", "port": 7004})})
    assert cfg.output_checks("a").refusal is False and cfg.output_checks("b").max_tokens is True
    assert cfg.output_checks("mine").repeat_limit == 1


def test_the_default_mesh_with_its_commented_checks_table_loads(tmp_path):
    # mesh.toml shows [checks.programmer] commented out: uncommented, it must load as it is.
    text = load_mesh(port_offset=0).source
    lines = open(text).read().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("# [checks.programmer]"))
    lines[at:at + 2] = [line[2:] for line in lines[at:at + 2]]
    path = tmp_path / "mesh.toml"
    path.write_text("\n".join(lines) + "\n")
    assert load_mesh(path, port_offset=0).output_checks("programmer-1").repeat_limit == 3
    path.write_text(path.read_text().replace("[checks.programmer]", "[checks.programer]"))
    with pytest.raises(ConfigError, match=r"checks.programer: no agent has the role 'programer' \(roles here: architect, "):
        load_mesh(path, port_offset=0)


@pytest.mark.parametrize("order", ["replicated first", "its namesake first"])
def test_a_service_named_as_another_ones_replica_is_refused_naming_both(order):
    """[services."web.1"] beside [services.web] replicas = 2: one entry silently replaced the
    other (the file's own web.1, on its own port, never ran, and the reload said "applied")."""
    web = {"command": ["srv"], "port": 7000, "socket": "inherit", "replicas": 2}
    own = {"command": ["other"], "port": 7010}
    services = {"web": web, "web.1": own} if order == "replicated first" else {"web.1": own, "web": web}
    with pytest.raises(ConfigError) as err:
        parse_mesh({"services": services}, source="mesh.toml")
    assert "services.web.1: a service of its own, but web has replicas = 2" in str(err.value)
