"""One definition per setting: flags, environment variables, `fastswitch up` and the services agree."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from executor_svc.config import ExecutorConfig
from openai_svc.config import HttpConfig
from scheduler_svc.config import SchedulerConfig
from svc_common.settings import add_arguments, env_names, from_args, to_argv
from svc_common.stack import Stack, StackConfig
from swap_daemon.config import SwapDaemonConfig


def _parse(config_type: type, argv: list[str], environ: dict[str, str] | None = None):  # noqa: ANN202
    parser = argparse.ArgumentParser()
    add_arguments(parser, config_type, environ=environ or {})
    return from_args(config_type, parser.parse_args(argv))


def test_environment_sets_defaults_and_flags_override_it() -> None:
    env = {
        "FASTSWITCH_SWAPD_PORT": "51111",
        "FASTSWITCH_HOST_BLOCKS": "77",
        "FASTSWITCH_SWAPD_WORKERS": "3",
        "FASTSWITCH_SWAPD_BACKEND": "cpu",
    }
    config = _parse(SwapDaemonConfig, [], env)
    assert (config.port, config.host_blocks, config.workers, config.backend) == (51111, 77, 3, "cpu")
    assert _parse(SwapDaemonConfig, ["--workers", "1"], env).workers == 1


def test_negated_booleans_and_repeated_items_read_from_flags_and_environment() -> None:
    config = _parse(SchedulerConfig, ["--no-kv-reuse", "--tenant-weight", "a=2", "--tenant-weight", "b=0.5"])
    assert config.kv_reuse is False and config.block_groups is True
    assert config.tenant_weights == {"a": 2.0, "b": 0.5}
    env = {"FASTSWITCH_SYNC_SWAPS": "yes", "FASTSWITCH_TENANT_WEIGHTS": "x=3,y=4"}
    config = _parse(SchedulerConfig, [], env)
    assert config.async_swaps is False
    assert config.tenant_weights == {"x": 3.0, "y": 4.0}


def test_to_argv_reproduces_the_config_exactly() -> None:
    original = SchedulerConfig(
        policy="vtc", preemption="recompute", kv_reuse=False, tenant_weights={"a": 2.0}, conversation_ttl_s=5.0
    )
    assert _parse(SchedulerConfig, to_argv(original)) == original
    executor = ExecutorConfig(device_blocks=12, block_size=32, model="/tmp/m")
    assert _parse(ExecutorConfig, to_argv(executor)) == executor


def test_a_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(SystemExit, match="FASTSWITCH_MAX_RUNNING"):
        _parse(SchedulerConfig, [], {"FASTSWITCH_MAX_RUNNING": "many"})


def test_up_reads_the_services_environment_and_passes_it_on_as_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTSWITCH_POLICY", "vtc")
    parser = argparse.ArgumentParser()
    StackConfig.add_arguments(parser)
    config = StackConfig.from_args(parser.parse_args(["--port", "6000", "--device-blocks", "9", "--host-blocks", "5"]))
    commands = Stack(config).commands()
    assert commands["scheduler"][commands["scheduler"].index("--policy") + 1] == "vtc"
    assert commands["scheduler"][commands["scheduler"].index("--executor") + 1] == "127.0.0.1:6001,127.0.0.1:6002"
    assert commands["executor"][commands["executor"].index("--device-blocks") + 1] == "9"
    assert commands["swapd"][commands["swapd"].index("--host-blocks") + 1] == "5"


def test_no_host_blocks_or_recompute_starts_no_swap_daemon() -> None:
    assert "swapd" not in Stack(StackConfig.build(host_blocks=0)).commands()
    commands = Stack(StackConfig.build(preemption="recompute")).commands()
    assert "swapd" not in commands
    assert commands["scheduler"][commands["scheduler"].index("--executor") + 1] == "127.0.0.1:50052"


def test_up_with_three_executors_starts_three_nodes_on_the_documented_ports() -> None:
    commands = Stack(StackConfig.build(port=7000, executors=3)).commands()
    assert set(commands) == {"executor", "swapd", "executor-1", "swapd-1", "executor-2", "swapd-2", "scheduler"}
    for name, port in [("executor", 7001), ("swapd", 7002), ("executor-1", 7003), ("swapd-1", 7004)]:
        assert commands[name][commands[name].index("--port") + 1] == str(port)
    scheduler = commands["scheduler"]
    nodes = [scheduler[i + 1] for i, flag in enumerate(scheduler) if flag == "--executor"]
    assert nodes == ["127.0.0.1:7001,127.0.0.1:7002", "127.0.0.1:7003,127.0.0.1:7004", "127.0.0.1:7005,127.0.0.1:7006"]


def test_the_scheduler_takes_one_executor_flag_per_node_and_the_environment_separates_them() -> None:
    args = ["--executor", "a:1,b:2", "--executor", "c:3"]
    config = _parse(SchedulerConfig, args, {"FASTSWITCH_EXECUTOR_ADDR": "x:9"})
    assert [str(n) for n in config.nodes] == ["a:1,b:2", "c:3"], "the flags replace the default, not add to it"
    from_env = _parse(SchedulerConfig, [], {"FASTSWITCH_EXECUTOR_ADDR": "a:1,b:2; c:3"})
    assert [(n.executor, n.swapd) for n in from_env.nodes] == [("a:1", "b:2"), ("c:3", "")]
    single = _parse(SchedulerConfig, ["--executor", "e:1", "--swapd", "s:2"], {})
    assert [str(n) for n in single.nodes] == ["e:1,s:2"]
    for bad in (["--executor", "nohost"], ["--executor", "a:1", "--executor", "a:1"]):
        with pytest.raises(ValueError):
            _parse(SchedulerConfig, bad, {})


def test_build_rejects_unknown_settings() -> None:
    with pytest.raises(TypeError, match="devise_blocks"):
        StackConfig.build(devise_blocks=3)


def test_every_service_variable_is_distinct_where_it_means_something_else() -> None:
    # The services share FASTSWITCH_MODEL (the same model), and the bind address, TLS files and drain
    # timeout that mean the same for every service; nothing else.
    every = {"FASTSWITCH_HOST", "FASTSWITCH_TLS_CERT", "FASTSWITCH_TLS_KEY", "FASTSWITCH_DRAIN_TIMEOUT_S"}
    sched, execu, swapd = env_names(SchedulerConfig), env_names(ExecutorConfig), env_names(SwapDaemonConfig)
    assert sched & execu == {"FASTSWITCH_MODEL"} | every
    assert sched & swapd == every and execu & swapd == every
    # The HTTP front shares the scheduler's key file and every service's TLS files.
    assert env_names(HttpConfig) & (sched | execu | swapd) == {
        "FASTSWITCH_API_KEYS",
        "FASTSWITCH_TLS_CERT",
        "FASTSWITCH_TLS_KEY",
    }


@pytest.mark.parametrize("service", ["scheduler_svc", "executor_svc", "swap_daemon", "openai_svc"])
def test_a_bad_flag_value_exits_2_with_one_line(service: str) -> None:
    proc = subprocess.run([sys.executable, "-m", service, "--port", "-5"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "port" in proc.stderr and "Traceback" not in proc.stderr


def test_up_starts_the_http_front_only_with_an_http_port_and_points_it_at_the_scheduler() -> None:
    assert "http" not in Stack(StackConfig.build(port=6000)).commands()
    parser = argparse.ArgumentParser()
    StackConfig.add_arguments(parser)
    args = parser.parse_args(["--port", "6000", "--http-port", "8080", "--default-max-tokens", "64"])
    stack = Stack(StackConfig.from_args(args))
    http = stack.commands()["http"]
    assert http[http.index("--port") + 1] == "8080"
    assert http[http.index("--scheduler") + 1] == "127.0.0.1:6000"
    assert http[http.index("--default-max-tokens") + 1] == "64"
    assert stack.http_url == "http://127.0.0.1:8080"


def test_up_gives_the_http_front_the_key_file_and_tls_and_the_ca_to_reach_the_scheduler(tmp_path: Path) -> None:
    keys, cert, key = tmp_path / "keys.txt", tmp_path / "c.pem", tmp_path / "k.pem"
    for f in (keys, cert, key):
        f.write_text("k1 team-a\n")
    parser = argparse.ArgumentParser()
    StackConfig.add_arguments(parser)
    argv = ["--port", "6000", "--http-port", "8080", "--api-keys", str(keys)]
    args = parser.parse_args([*argv, "--tls-cert", str(cert), "--tls-key", str(key)])
    stack = Stack(StackConfig.from_args(args))
    http, scheduler = stack.commands()["http"], stack.commands()["scheduler"]
    for cmd in (http, scheduler):
        assert cmd[cmd.index("--api-keys") + 1] == str(keys)
        assert cmd[cmd.index("--tls-cert") + 1] == str(cert)
    assert http[http.index("--scheduler-tls-ca") + 1] == str(cert)  # self-signed: the certificate is the CA
    assert stack.http_url == "https://127.0.0.1:8080"


def test_the_http_port_comes_from_the_environment_on_up_and_on_the_front(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTSWITCH_HTTP_PORT", "8111")
    parser = argparse.ArgumentParser()
    StackConfig.add_arguments(parser)
    assert StackConfig.from_args(parser.parse_args([])).http_port == 8111
    assert _parse(HttpConfig, [], {"FASTSWITCH_HTTP_PORT": "8111"}).port == 8111
