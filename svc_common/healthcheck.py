"""`python -m svc_common.healthcheck HOST:PORT`: exit 0 when the gRPC service there answers SERVING.

For container health checks (docker-compose, Kubernetes exec probes) where no grpc_health_probe binary
is installed: every FastSwitch service serves the standard gRPC health protocol (svc_common/server.py).
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from svc_common.server import sync_channel


def check(addr: str, service: str = "", timeout_s: float = 3.0, tls_ca: str = "") -> str:
    """The health status name at `addr` ("SERVING", "NOT_SERVING", ...) or the gRPC error code's name;
    over TLS verified against `tls_ca` when given."""
    with sync_channel(addr, tls_ca) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as err:
            return err.code().name  # type: ignore[attr-defined]
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("addr", metavar="HOST:PORT")
    parser.add_argument("--service", default="", help="a service name (default: the server as a whole)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    parser.add_argument("--tls-ca", default="", metavar="FILE", help="PEM CA of a service that serves TLS")
    args = parser.parse_args(argv)
    status = check(args.addr, args.service, args.timeout, args.tls_ca)
    if status != "SERVING":
        print(f"{args.addr}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
