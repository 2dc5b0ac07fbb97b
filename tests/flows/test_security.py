"""Keeping others out: a Ray cluster that demands its token, a Prefect server that demands its
auth string, and `--insecure` on record.

Every server here is started by the test in its own process group and killed with that group,
whatever the outcome. Clients speak to them only on 127.0.0.1 (Ray listens on every interface
whatever it is told; that is why it needs its token). A node started with node address
127.0.0.2 is, to Ray, a node on another host: that is how a cluster across hosts is built on
one machine.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from qrobust.tasks.runtime.workspace import Workspace
from tests.conftest import REPO_ROOT
from tests.flows.test_grid import GRID, _results, _rows

ray = pytest.importorskip("ray", reason="the Ray extra is not installed: pip install -e '.[ray]'")

AUTH_STRING = "qrobust:not-a-real-secret"
START_TIMEOUT_S = 180
OFF_LOOPBACK_API = "http://prefect.invalid:4200/api"  # never contacted: refused before any request


# --------------------------------------------------------------------------- servers the tests start

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without any Ray address, Ray token setting or Prefect API of its own."""
    inherited = {k: v for k, v in os.environ.items()
                 if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "PREFECT_API_"))}
    return {**inherited, **extra}


@contextlib.contextmanager
def _process_group(command: list[str], env: dict[str, str], log: Path, ready):
    """Run `command` in a process group of its own until the block ends; `ready()` says it is up."""
    with open(log, "wb") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{command[0]} did not start: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # `ray start --block` leaves its children behind on SIGTERM
        process.wait()


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def _ray_start(home: Path, log: Path, *arguments: str, auth_mode: str, ready_port: int | None = None):
    """`ray start --block` with its own home, temporary folder and ports, and its readiness test
    (the node is up and, if given, `ready_port` listens); returns both and the temporary folder."""
    temp_dir = tempfile.mkdtemp(prefix="qr-ray-", dir="/tmp")  # Ray's socket paths must stay short
    command = ["ray", "start", "--block", "--disable-usage-stats", "--temp-dir", temp_dir,
               "--dashboard-agent-listen-port", str(_free_port()), *arguments]
    env = _clean_env(HOME=str(home), RAY_AUTH_MODE=auth_mode)

    def ready() -> bool:
        return b"Ray runtime started" in log.read_bytes() and (ready_port is None or _listening(ready_port))

    return [command, env, log, ready], temp_dir


@contextlib.contextmanager
def ray_head(root: Path, auth_mode: str, tls: dict[str, str] | None = None):
    """A Ray head on this machine, addressed as 127.0.0.1:PORT. With `auth_mode` token, its token
    is made as the README makes it (`ray get-auth-token --generate`, into the head's home);
    `tls` is Ray's TLS settings (RAY_USE_TLS and its files), if any."""
    home = root / "head-home"
    home.mkdir()
    if auth_mode == "token":
        subprocess.run(["ray", "get-auth-token", "--generate"], env=_clean_env(HOME=str(home)), check=True,
                       capture_output=True)
    port, client_port = _free_port(), _free_port()
    arguments, temp_dir = _ray_start(home, root / "head.log", "--head", "--port", str(port),
                                     "--ray-client-server-port", str(client_port), "--dashboard-port",
                                     str(_free_port()), "--include-dashboard", "false", "--num-cpus", "2",
                                     auth_mode=auth_mode, ready_port=client_port)
    arguments[1].update(tls or {})
    try:
        with _process_group(*arguments):
            yield {"address": f"127.0.0.1:{port}", "client_address": f"ray://127.0.0.1:{client_port}",
                   "token": home / ".ray" / "auth_token", "root": root}
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def ray_node_on_another_host(head: dict):
    """A second node that joins `head` with node address 127.0.0.2."""
    home = head["root"] / "node-home"
    home.mkdir()
    arguments, temp_dir = _ray_start(home, head["root"] / "node.log", "--address", head["address"],
                                     "--node-ip-address", "127.0.0.2", "--num-cpus", "1", auth_mode="disabled")
    try:
        with _process_group(*arguments):
            yield
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def prefect_server(root: Path, auth_string: str | None = AUTH_STRING):
    """`prefect server start` on 127.0.0.1 with `auth_string` (None: without one), its database in `root`."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = _clean_env(PREFECT_HOME=str(root / "prefect-home"))
    if auth_string:
        env["PREFECT_SERVER_API_AUTH_STRING"] = auth_string
    command = ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui", "--analytics-off"]
    with _process_group(command, env, root / "prefect.log", lambda: _status(f"{url}/health") == 200):
        yield url


def _status(url: str, auth: str | None = None, body: dict | None = None) -> int:
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _post(url: str, body: dict):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={
        "Content-Type": "application/json",
        "Authorization": "Basic " + base64.b64encode(AUTH_STRING.encode()).decode()})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    with ray_head(tmp_path_factory.mktemp("token-head"), "token") as head:
        yield head


@pytest.fixture(scope="module")
def open_cluster_across_hosts(tmp_path_factory):
    with ray_head(tmp_path_factory.mktemp("open-head"), "disabled") as head, ray_node_on_another_host(head):
        yield head


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as url:
        yield url


# --------------------------------------------------------------------------- running qrobust

def _grid_file(tmp_path: Path, extra: str = "") -> str:
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID.format(bits=4) + extra)
    return str(grid)


def _qrobust_run(tmp_path: Path, *arguments: str, env: dict[str, str], grid_extra: str = "", timeout: int = 120):
    command = [sys.executable, "-m", "qrobust", "run", _grid_file(tmp_path, grid_extra),
               "--workspace", str(tmp_path / "ws"), "--no-report", *arguments]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _one_error_line(result) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("qrobust: error:")]
    assert len(errors) == 1 and errors[0] == result.stderr.strip().splitlines()[-1], result.stderr[-3000:]
    return errors[0]


def _copy_of(token: Path, tmp_path: Path) -> str:
    """The head's token as a client machine holds it: a copy of the file."""
    copy = tmp_path / "auth_token"
    shutil.copy(token, copy)
    return str(copy)


# --------------------------------------------------------------------------- Ray: a cluster that demands its token

def test_the_token_head_refuses_calls_without_its_token(token_head):
    from qrobust.flows.security import ray_demands_token

    assert ray_demands_token(token_head["address"])
    assert ray_demands_token(token_head["client_address"])


def test_a_cluster_with_ray_tls_is_asked_over_tls(tmp_path, monkeypatch):
    from qrobust.flows.security import AccessError, ray_demands_token

    names = f"subjectAltName=IP:127.0.0.1,IP:{ray.util.get_node_ip_address()}"  # Ray's own nodes use the latter
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=ray",
                    "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem"), "-addext", names],
                   check=True, capture_output=True)
    tls = {"RAY_USE_TLS": "1", "RAY_TLS_SERVER_CERT": str(tmp_path / "cert.pem"),
           "RAY_TLS_SERVER_KEY": str(tmp_path / "key.pem"), "RAY_TLS_CA_CERT": str(tmp_path / "cert.pem")}
    with ray_head(tmp_path, "token", tls) as head:
        for name, value in tls.items():
            monkeypatch.setenv(name, value)
        assert ray_demands_token(head["address"])
        monkeypatch.delenv("RAY_USE_TLS")
        with pytest.raises(AccessError, match="gRPC UNAVAILABLE .a cluster with Ray's TLS on needs RAY_USE_TLS=1"):
            ray_demands_token(head["address"])


def test_a_client_without_the_token_is_refused_with_one_line(token_head, tmp_path):
    result = _qrobust_run(tmp_path, "--runner", "ray", "--address", token_head["address"], env=_clean_env())
    assert f"the Ray cluster at {token_head['address']} demands a token: set RAY_AUTH_MODE=token" \
        in _one_error_line(result)


def test_a_client_with_another_token_is_refused_with_one_line(token_head, tmp_path):
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 32)
    env = _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(wrong))
    result = _qrobust_run(tmp_path, "--runner", "ray", "--address", token_head["client_address"], env=env)
    line = _one_error_line(result)
    assert f"the Ray cluster at {token_head['client_address']} refuses this machine's token" in line


# --------------------------------------------------------------------------- Prefect: a server with an auth string

def test_the_prefect_server_answers_401_to_a_client_without_its_auth_string(prefect_api):
    assert _status(f"{prefect_api}/hello") == 401
    assert _status(f"{prefect_api}/flow_runs/filter", body={}) == 401
    assert _status(f"{prefect_api}/hello", auth="qrobust:wrong") == 401
    assert _status(f"{prefect_api}/hello", auth=AUTH_STRING) == 200


def test_a_run_without_the_auth_string_is_refused_with_one_line(prefect_api, tmp_path):
    result = _qrobust_run(tmp_path, env=_clean_env(PREFECT_API_URL=prefect_api))
    assert f"the Prefect API at {prefect_api} refuses this client (HTTP 401)" in _one_error_line(result)


def test_a_prefect_api_off_loopback_without_credentials_is_refused_with_one_line(tmp_path):
    result = _qrobust_run(tmp_path, env=_clean_env(PREFECT_API_URL=OFF_LOOPBACK_API))
    line = _one_error_line(result)
    assert f"the Prefect API at {OFF_LOOPBACK_API} is off loopback and this client has no credentials" in line
    assert "PREFECT_SERVER_API_AUTH_STRING" in line and "--insecure" in line


def test_only_a_server_without_an_auth_string_answers_a_request_without_credentials(prefect_api, tmp_path):
    from qrobust.flows.security import prefect_answers_anyone

    assert not prefect_answers_anyone(prefect_api)
    with prefect_server(tmp_path, auth_string=None) as open_api:
        assert prefect_answers_anyone(open_api)


def test_credentials_are_not_asked_of_an_api_on_loopback():
    from qrobust.flows.security import prefect_api_problem

    assert prefect_api_problem("http://127.0.0.1:4200/api") is None
    assert "no credentials" in prefect_api_problem(OFF_LOOPBACK_API)


# --------------------------------------------------------------------------- the grid behind both

@pytest.mark.slow
def test_the_grid_runs_on_the_token_head_and_reports_to_the_authenticated_prefect_server(
        token_head, prefect_api, tmp_path):
    env = _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=_copy_of(token_head["token"], tmp_path),
                     PREFECT_API_URL=prefect_api, PREFECT_API_AUTH_STRING=AUTH_STRING)
    result = _qrobust_run(tmp_path, "--runner", "ray", "--address", token_head["address"], env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    workspace = Workspace.at(tmp_path / "ws")
    assert len(_results(workspace)) == 4
    placements = _rows(workspace, "SELECT placement FROM stage_events WHERE stage = 'generate'")
    assert len(placements) == 4 * 2 and all(json.loads(p)["node"] for p, in placements)
    assert _rows(workspace, "SELECT count(*) FROM stage_events WHERE stage = 'security'") == [(0,)]
    flow_runs = _post(f"{prefect_api}/flow_runs/filter", {"flows": {"name": {"any_": ["qrobust-grid"]}}})
    assert [run["state_type"] for run in flow_runs] == ["COMPLETED"]
    deadline = time.monotonic() + 60  # task runs reach the server as events, a moment after they end
    while _post(f"{prefect_api}/task_runs/count", {}) < 4 * 2 * 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert _post(f"{prefect_api}/task_runs/count", {}) >= 4 * 2 * 2  # a generation and an execution per shard


# --------------------------------------------------------------------------- Ray: a cluster that demands nothing

def test_an_open_cluster_with_nodes_on_other_hosts_is_refused_with_one_line(open_cluster_across_hosts, tmp_path):
    address = open_cluster_across_hosts["address"]
    result = _qrobust_run(tmp_path, "--runner", "ray", "--address", address, env=_clean_env(), timeout=300)
    line = _one_error_line(result)
    assert f"the Ray cluster at {address} demands no token and has nodes on other hosts (127.0.0.2)" in line
    assert "ray get-auth-token --generate" in line and "--insecure" in line


def test_insecure_lets_an_open_cluster_across_hosts_through_to_the_next_check(open_cluster_across_hosts, tmp_path):
    address = open_cluster_across_hosts["address"]
    result = _qrobust_run(tmp_path, "--runner", "ray", "--address", address, "--insecure", env=_clean_env(),
                          timeout=300)
    # the workers on the other host could not report to this machine's temporary Prefect API
    assert "Ray nodes on other hosts (127.0.0.2) cannot reach the Prefect API" in _one_error_line(result)


def test_a_local_ray_instance_that_demands_no_token_is_announced(tmp_path):
    result = _qrobust_run(tmp_path, "--runner", "ray", grid_extra="[scale]\nquantize_gpus = 1\n", timeout=300,
                          env=_clean_env(RAY_AUTH_MODE="disabled", CUDA_VISIBLE_DEVICES=""))
    assert "the Ray cluster has 0 GPUs but a quantize run asks for 1" in _one_error_line(result)  # stops it there
    warnings = [line for line in result.stderr.splitlines() if line.startswith("qrobust: WARNING:")]
    assert len(warnings) == 1 and "the local Ray instance demands no token" in warnings[0], result.stderr


# --------------------------------------------------------------------------- what --insecure let through, on record

@pytest.mark.slow
def test_a_run_records_what_insecure_let_through(tmp_path):
    from qrobust.flows.grid import grid_flow
    from qrobust.flows.runners import RunnerSpec, prefect_settings
    from qrobust.tasks.grid_file import parse_grid

    waived = f"the Prefect API at {OFF_LOOPBACK_API} is off loopback and this client has no credentials for it"
    workspace = Workspace.at(tmp_path / "ws")
    with prefect_settings():
        summary = grid_flow(parse_grid(GRID.format(bits=4)), workspace, RunnerSpec(), frozenset(), False, (waived,))
    assert summary["done"] == 4
    assert _rows(workspace, "SELECT cell_id, state, error FROM stage_events WHERE stage = 'security'") == [
        ("e2e", "Insecure", waived)]
    configs = [json.loads(config) for config, in _rows(workspace, "SELECT config_json FROM runs")]
    assert len(configs) == 4 and all(config["insecure"] == [waived] for config in configs)
