"""Who else can use what a run joins: the Ray cluster and the Prefect API.

A Ray cluster runs whatever code its clients send, on every node; a Prefect API lets its
clients create and run deployments, change states and read blocks. Open to a network, either is
open to everyone on it. So a run joins a Ray cluster with nodes on other hosts only if the
cluster demands Ray's token (`RAY_AUTH_MODE=token`), and uses a Prefect API off loopback only
with credentials the API demands (`PREFECT_API_AUTH_STRING` against the server's
`PREFECT_SERVER_API_AUTH_STRING`, or a Prefect Cloud API key). Where this process lacks the
credentials a cluster or API demands, the run stops at once with one line saying so, instead of
Ray retrying for a minute or Prefect failing mid-flow.

`insecure=True` (`qrobust run --insecure`) lets a run go on where no credentials are demanded;
each check returns one line per thing it let through, and the run records those lines.
docs/security.md has the threat model.
"""

from __future__ import annotations

import logging
from urllib.parse import urlparse

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
PROBE_TIMEOUT_S = 10.0

RAY_TOKEN_RECIPE = ("generate a token with `ray get-auth-token --generate`, copy ~/.ray/auth_token to every node "
                    "and start head and workers with RAY_AUTH_MODE=token (README: Scaling out)")
RAY_TOKEN_HERE = ("set RAY_AUTH_MODE=token here and give this machine the cluster's token "
                  "(~/.ray/auth_token, or RAY_AUTH_TOKEN_PATH=FILE)")
PREFECT_AUTH_RECIPE = ("start its server with PREFECT_SERVER_API_AUTH_STRING=USER:PASSWORD and set the same "
                       "PREFECT_API_AUTH_STRING here, or PREFECT_API_KEY for Prefect Cloud (README: Scaling out)")
OVERRIDE = "; `--insecure` runs anyway and records it"

log = logging.getLogger(__name__)


class AccessError(ValueError):
    """A cluster or API that anyone could use, or one that refuses this client; the message is one line."""


# --------------------------------------------------------------------------- Ray

def ray_demands_token(address: str) -> bool:
    """Whether the Ray cluster at `address` refuses a client that presents no token.

    `address` is its GCS (`host:port`) or its Ray Client server (`ray://host:port`). The cluster
    is asked by one call that carries no token: Ray's servers answer it only when token
    authentication is off.
    """
    import grpc

    status = _ray_call(address, metadata=())
    if status == grpc.StatusCode.UNAUTHENTICATED:
        return True
    if status == grpc.StatusCode.OK:
        return False
    tls = " (a cluster with Ray's TLS on needs RAY_USE_TLS=1 and its RAY_TLS_* files here too)"
    raise AccessError(f"cannot ask the Ray cluster at {address} whether it demands a token: gRPC {status.name}"
                      + (tls if status == grpc.StatusCode.UNAVAILABLE else ""))


def check_ray_token_presented(address: str) -> None:
    """This process presents a token that the cluster at `address` accepts.

    Without one, `ray.init` retries for a minute and then says only that it cannot connect.
    """
    import grpc
    from ray._private.authentication.authentication_utils import is_token_auth_enabled
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError

    if not is_token_auth_enabled():
        raise AccessError(f"the Ray cluster at {address} demands a token: {RAY_TOKEN_HERE}")
    loader = AuthenticationTokenLoader.instance()
    try:
        has_token = loader.has_token()
    except AuthenticationError as exc:  # a token source is named but unreadable; Ray's first sentence says which
        raise AccessError(f"the Ray cluster at {address} demands a token: {str(exc).split('. ')[0]}") from None
    if not has_token:
        raise AccessError(f"the Ray cluster at {address} demands a token and this machine has none: {RAY_TOKEN_HERE}")
    token = tuple(loader.get_token_for_http_header().items())
    if _ray_call(address, metadata=token) == grpc.StatusCode.UNAUTHENTICATED:
        raise AccessError(f"the Ray cluster at {address} refuses this machine's token: copy the head's "
                          "~/.ray/auth_token here (or point RAY_AUTH_TOKEN_PATH at a copy)")


def check_ray_cluster(cluster: str, demands_token: bool, nodes_elsewhere: list[str], insecure: bool) -> list[str]:
    """What a joined cluster (`cluster` names it) lets others do: refused where it demands no
    token and has nodes on other hosts (unless `insecure`), announced where it demands none on
    this host alone (Ray listens on every interface all the same).

    Returns the one line that `insecure` let through, if any.
    """
    if demands_token:
        return []
    if not nodes_elsewhere:
        log.warning("%s demands no token: while it runs, anyone who reaches this machine can run code on it; %s",
                    cluster, RAY_TOKEN_RECIPE)
        return []
    problem = f"{cluster} demands no token and has nodes on other hosts ({', '.join(nodes_elsewhere)})"
    if not insecure:
        raise AccessError(f"{problem}: anyone who reaches it can run code on every node; {RAY_TOKEN_RECIPE}{OVERRIDE}")
    return [problem]


def _ray_call(address: str, metadata: tuple) -> "grpc.StatusCode":
    """The status of one cheap call to a Ray cluster's GCS or Ray Client server, with `metadata`."""
    import grpc

    client_server = address.startswith("ray://")
    with _ray_channel(address.removeprefix("ray://")) as channel:
        try:
            if client_server:
                from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc

                ping = ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING)
                ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo(ping, timeout=PROBE_TIMEOUT_S,
                                                                          metadata=metadata)
            else:
                from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

                gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                    gcs_service_pb2.GetClusterIdRequest(), timeout=PROBE_TIMEOUT_S, metadata=metadata)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def _ray_channel(target: str):
    """A gRPC channel to `target` over TLS where Ray uses TLS (RAY_USE_TLS), as Ray's own clients open it."""
    import os

    import grpc

    if os.environ.get("RAY_USE_TLS", "0").lower() not in ("1", "true"):
        return grpc.insecure_channel(target)
    from ray._common.tls_utils import load_certs_from_env

    certificate_chain, private_key, ca_certificate = load_certs_from_env()
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_certificate, private_key=private_key,
                                               certificate_chain=certificate_chain)
    return grpc.secure_channel(target, credentials)


# --------------------------------------------------------------------------- Prefect

def check_prefect_api(insecure: bool) -> list[str]:
    """The Prefect API this run will use (PREFECT_API_URL) keeps others out and accepts this
    client; a temporary API on loopback (no PREFECT_API_URL) is not checked.

    An API with a `prefect_api_problem` is refused unless `insecure`; any configured API that
    refuses this client's credentials is refused. Returns the line that `insecure` let through.
    """
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return []
    problem = prefect_api_problem(url)
    if problem and not insecure:
        raise AccessError(f"{problem}: anyone who reaches it can run deployments on its workers; "
                          f"{PREFECT_AUTH_RECIPE}{OVERRIDE}")
    _check_prefect_accepts_this_client(url)
    return [problem] if problem else []


def prefect_api_problem(url: str) -> str | None:
    """Why the Prefect API at `url` would let others in, or None: off loopback, this client has
    no credentials for it (asked of no one), or it answers a request that carries none."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY

    if urlparse(url).hostname in LOOPBACK_HOSTS:
        return None
    if not (PREFECT_API_AUTH_STRING.value() or PREFECT_API_KEY.value()):
        return f"the Prefect API at {url} is off loopback and this client has no credentials for it"
    if prefect_answers_anyone(url):
        return f"the Prefect API at {url} answers clients without credentials"
    return None


def prefect_answers_anyone(url: str) -> bool:
    """Whether the API answers a request that carries no credentials (any refusal, 401 from a
    server with an auth string or whatever Prefect Cloud says, means it does not)."""
    import httpx

    try:
        return httpx.get(f"{url.rstrip('/')}/hello", timeout=PROBE_TIMEOUT_S).is_success
    except httpx.TransportError as exc:
        raise AccessError(f"cannot reach the Prefect API at {url}: {_first_line(exc)}") from None


def _check_prefect_accepts_this_client(url: str) -> None:
    """One request with the credentials Prefect's own client sends, so that a refusal is one line
    now rather than a traceback from inside the flow."""
    import httpx
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            client.hello()
    except httpx.HTTPStatusError as exc:
        status = exc.response.status_code
        if status in (401, 403):
            raise AccessError(f"the Prefect API at {url} refuses this client (HTTP {status}): set "
                              "PREFECT_API_AUTH_STRING to its server's PREFECT_SERVER_API_AUTH_STRING "
                              "(or PREFECT_API_KEY for Prefect Cloud)") from None
        raise AccessError(f"the Prefect API at {url} answered HTTP {status}") from None
    except httpx.TransportError as exc:
        raise AccessError(f"cannot reach the Prefect API at {url}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:500]
