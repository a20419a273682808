"""`python -m openai_svc` (or `fastswitch http`): the OpenAI-compatible HTTP API over a running scheduler."""

from __future__ import annotations

from openai_svc.config import HttpConfig
from svc_common.auth import KeyRing
from svc_common.logs import configure_logging, get_logger
from svc_common.settings import run_parser

GRACE_S = 5


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from openai_svc.app import create_app

    config = run_parser("fastswitch http", __doc__, HttpConfig, argv)
    if config.api_keys:
        try:
            KeyRing.load(config.api_keys)
        except ValueError as err:
            raise SystemExit(f"fastswitch http: error: {err}") from None
    configure_logging("http")
    get_logger(__name__).info(
        "starting", port=config.port, bind=config.bind, scheduler=config.scheduler_addr, tls=bool(config.tls_cert)
    )
    # uvicorn stops on SIGINT/SIGTERM: no new connections, live streams get GRACE_S to finish.
    uvicorn.run(
        create_app(config),
        host=config.bind,
        port=config.port,
        loop="asyncio",  # grpc.aio (the scheduler client) runs on the standard loop
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=GRACE_S,
        ssl_certfile=config.tls_cert or None,
        ssl_keyfile=config.tls_key or None,
    )


if __name__ == "__main__":
    main()
