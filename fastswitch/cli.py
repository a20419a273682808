"""The `fastswitch` command: run the stack or one service, talk to a running stack, benchmark.

fastswitch up [--port 50051] [--model PATH] ...      # start all services, print "ready", Ctrl-C stops
fastswitch generate "The capital of France is"      # stream a completion to stdout
fastswitch chat                                      # interactive multi-turn chat
fastswitch stats                                     # scheduler statistics as one JSON object
fastswitch scheduler|executor|swapd|http [...]       # one service (what docker-compose runs)
fastswitch bench [--preset tiny|small|gpu]           # benchmark every mode on one workload

generate, chat and stats need only the client (the base install); the other commands import server code
lazily and, where its extra is not installed, say which one to install.

Clients take --api-key KEY (or FASTSWITCH_API_KEY) and --tls-ca FILE (or FASTSWITCH_TLS_CA). A bad flag
or value exits 2 with one line saying what is wrong; a request the server failed or cut exits 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import signal
import sys
import time
import uuid

from fastswitch import __version__
from fastswitch._extras import install_hint, missing
from fastswitch.client import (
    API_KEY_ENV,
    DEFAULT_ADDR,
    TLS_CA_ENV,
    Client,
    FastSwitchError,
    InvalidRequest,
    PermissionDenied,
    Unauthenticated,
)

# The commands that run server code: the extra each needs, and the module each runs (imported only for it).
SERVER_COMMANDS = {
    "up": ("server", "svc_common.stack"),
    "scheduler": ("server", "scheduler_svc.__main__"),
    "executor": ("server", "executor_svc.__main__"),
    "swapd": ("server", "swap_daemon.__main__"),
    "http": ("http", "openai_svc.__main__"),
    "bench": ("bench", "fastswitch_bench.runner"),
}
SERVICES = ("scheduler", "executor", "swapd", "http")
# This distribution's own top-level packages: one missing is a broken install, not a missing extra.
OWN_PACKAGES = {
    "fastswitch",
    "fastswitch_bench",
    "svc_common",
    "scheduler_svc",
    "executor_svc",
    "swap_daemon",
    "openai_svc",
}


class _Parser(argparse.ArgumentParser):
    """Bad flags and values: one line (`fastswitch generate: error: ...`) and exit 2, no usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default (none shown where there is none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, "") or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action) or ""


def _client(args: argparse.Namespace, timeout: float | None = None) -> Client:
    kwargs = {"api_key": args.api_key, "tls_ca": args.tls_ca}
    return Client(args.addr, timeout=timeout, **kwargs) if timeout else Client(args.addr, **kwargs)


def _cmd_up(args: argparse.Namespace) -> int:
    from svc_common.logs import configure_logging
    from svc_common.stack import Stack, StackConfig

    configure_logging("fastswitch-up")
    try:
        config = StackConfig.from_args(args)
    except ValueError as err:
        print(f"fastswitch up: error: {err}", file=sys.stderr)
        return 2
    stack = Stack(config, log_dir=args.log_dir)
    # A plain flag: a signal handler must not take locks (Event.set would deadlock against wait()).
    stop = {"requested": False}

    def request_stop(*_: object) -> None:
        stop["requested"] = True

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt  # while starting: unwind, and Stack.start stops what it started

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    try:
        addr = stack.start(timeout_s=args.timeout)
    except (RuntimeError, TimeoutError) as err:
        print(
            f"fastswitch up failed: {err} (see logs in {args.log_dir or 'the service output'})",
            file=sys.stderr,
        )
        return 1
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)
    http = f" (OpenAI API at {stack.http_url}/v1, metrics at {stack.http_url}/metrics)" if stack.http_url else ""
    print(f"fastswitch ready at {addr}{http}", flush=True)
    try:
        while not stop["requested"]:
            time.sleep(0.2)
            # A service that died is restarted (with backoff); the scheduler replays its requests.
            for restart in stack.supervise():
                print(
                    f"fastswitch up: the {restart.name} exited (code {restart.exit_code}); restarted it",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        stack.stop()
        print("fastswitch stopped", file=sys.stderr, flush=True)
    return 0


def _generate_kwargs(args: argparse.Namespace) -> dict[str, object]:
    return dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop or (),
        chat=args.chat,
        tenant=args.tenant,
        priority=args.priority,
        conversation_id=args.conversation or "",
        system_prompt=args.system or "",
    )


def _structured_output(args: argparse.Namespace) -> dict[str, object]:
    """generate's --json-schema FILE | --regex R | --choice a,b,c | --grammar FILE as SDK keywords."""
    if args.json_schema:
        text = _read(args.json_schema, "--json-schema")
        try:
            json.loads(text)
        except ValueError as err:
            raise SystemExit(f"fastswitch generate: --json-schema {args.json_schema} is not JSON: {err}") from None
        return {"json_schema": text}
    if args.regex is not None:
        return {"regex": args.regex}
    if args.choice is not None:
        return {"choice": args.choice.split(",")}
    if args.grammar:
        return {"grammar": _read(args.grammar, "--grammar")}
    return {}


def _read(path: str, flag: str) -> str:
    try:
        return sys.stdin.read() if path == "-" else pathlib.Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise SystemExit(f"fastswitch generate: cannot read {flag} {path}: {err.strerror}") from None


def _stream(client: Client, prompt: str, kwargs: dict[str, object]) -> int:
    """Write the completion to stdout; 0 when it finished, 1 (and a message) when the server ended it."""
    finish = None
    for chunk in client.generate(prompt, **kwargs):  # type: ignore[arg-type]
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        finish = chunk.finish_reason
    sys.stdout.write("\n")
    if finish in ("cancelled", "error"):
        print(f"fastswitch: the server ended the request ({finish}); the output is incomplete", file=sys.stderr)
        return 1
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    with _client(args, timeout=args.timeout) as client:
        return _stream(client, prompt, {**_generate_kwargs(args), **_structured_output(args)})


def _cmd_chat(args: argparse.Namespace) -> int:
    conversation = args.conversation or f"chat-{uuid.uuid4().hex[:8]}"
    args.chat = True
    kwargs = _generate_kwargs(args)
    kwargs["conversation_id"] = conversation
    with _client(args, timeout=args.timeout) as client:
        print(f"conversation {conversation}; empty line or Ctrl-D ends it", file=sys.stderr)
        while True:
            try:
                line = input("you> ")
            except EOFError:
                break
            if not line.strip():
                break
            sys.stdout.write("model> ")
            if _stream(client, line, kwargs) != 0:
                return 1
            kwargs["system_prompt"] = ""
        try:
            client.end_conversation(conversation, tenant=args.tenant)
        except FastSwitchError:
            pass
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(json.dumps(client.stats(), indent=2, sort_keys=True))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from fastswitch_bench.runner import main as bench_main

    return bench_main(args)


def _add_connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--addr", default=DEFAULT_ADDR, help="scheduler HOST:PORT")
    p.add_argument(
        "--api-key", default=None, help=f"API key, sent as `authorization: Bearer KEY` (default: env {API_KEY_ENV})"
    )
    p.add_argument(
        "--tls-ca",
        default=None,
        metavar="FILE",
        help=f"PEM CA that verifies the server's certificate: connect with TLS (default: env {TLS_CA_ENV}; "
        "unset: plain text)",
    )


def _add_sampling(p: argparse.ArgumentParser) -> None:
    _add_connection(p)
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 = all")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--priority", type=int, default=0, help="larger runs first (priority policy)")
    p.add_argument("--tenant", default="", help="tenant for fair-share accounting")
    p.add_argument("--conversation", default=None, help="conversation id: continue (or start) it")
    p.add_argument("--system", default=None, help="system prompt (chat)")
    p.add_argument("--timeout", type=float, default=600.0, help="deadline in seconds")


def build_parser(server: bool = True) -> argparse.ArgumentParser:
    """The whole CLI. With `server=False` the `up` command's settings are left out: reading them imports the
    services' configs, which a client-only install does not need (and `up` is not being run)."""
    parser = _Parser(prog="fastswitch", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    up = sub.add_parser(
        "up",
        help="start scheduler, executor and swap daemon locally",
        description="Start the scheduler, executor and swap daemon as local processes (executor on --port+1, "
        "swap daemon on --port+2); print a line with 'ready' once all are healthy; a service that dies is "
        "restarted with backoff; SIGINT/SIGTERM drains the scheduler, then stops them all.",
    )
    if server:
        from svc_common.stack import StackConfig

        StackConfig.add_arguments(up)
    up.add_argument("--log-dir", default=None, help="write each service's log here")
    up.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for readiness")
    up.set_defaults(func=_cmd_up)

    gen = sub.add_parser("generate", help="stream a completion to stdout", formatter_class=_Help)
    _add_sampling(gen)
    gen.add_argument("--chat", action="store_true", help="apply the chat template")
    structured = gen.add_mutually_exclusive_group()
    structured.add_argument("--json-schema", metavar="FILE", help="the output is JSON valid against this schema")
    structured.add_argument("--regex", metavar="R", help="the whole output matches this regular expression")
    structured.add_argument("--choice", metavar="A,B,C", help="the output is exactly one of these strings")
    structured.add_argument("--grammar", metavar="FILE", help="the output matches this EBNF grammar (rule `root`)")
    gen.add_argument("prompt", help="prompt text ('-' reads stdin)")
    gen.set_defaults(func=_cmd_generate)

    chat = sub.add_parser("chat", help="interactive multi-turn chat", formatter_class=_Help)
    _add_sampling(chat)
    chat.set_defaults(func=_cmd_chat)

    stats = sub.add_parser("stats", help="print scheduler statistics as JSON", formatter_class=_Help)
    _add_connection(stats)
    stats.set_defaults(func=_cmd_stats)

    for name, module in (
        ("scheduler", "scheduler_svc"),
        ("executor", "executor_svc"),
        ("swapd", "swap_daemon"),
        ("http", "openai_svc"),
    ):
        p = sub.add_parser(name, help=f"run the {name} service alone", add_help=False)
        p.set_defaults(func=None, service=module)

    bench = sub.add_parser("bench", help="benchmark every mode on one multi-turn workload", formatter_class=_Help)
    bench.add_argument("--preset", choices=["tiny", "small", "reuse", "gpu"], default="small")
    bench.add_argument(
        "--modes",
        default=None,
        help="comma-separated, default all: fastswitch,no-groups,no-async,no-reuse,vllm-like,recompute,transformers-cb",
    )
    bench.add_argument("--json", default=None, help="also write the results JSON here")
    bench.add_argument("--out", default="bench-results", help="results directory")
    bench.add_argument("--addr", default=None, help="benchmark a running stack instead of starting one")
    bench.add_argument("--workload", default=None, help="replay a saved workload.json instead of drawing one")
    bench.add_argument("--seed", type=int, default=None, help="workload seed (default: the preset's, 0)")
    bench.add_argument("--conversations", type=int, default=None, help="override the preset's conversation count")
    bench.add_argument("--rate", type=float, default=None, help="override the conversation arrival rate (per s)")
    bench.add_argument("--priority-updates", choices=["none", "random", "markov"], default=None)
    bench.add_argument("--priority-update-prob", type=float, default=None, help="per live request, per iteration")
    bench.add_argument("--device-blocks", type=int, default=None, help="override the preset's device KV pool")
    bench.add_argument("--host-blocks", type=int, default=None, help="override the preset's host KV pool")
    bench.add_argument("--model", default=None, help="HF directory or GGUF file for the stack and the peer")
    bench.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default=None)
    bench.add_argument(
        "--load-format", choices=["auto", "dummy"], default=None, help="dummy: random weights from config.json"
    )
    bench.add_argument("--executors", type=int, default=None, help="executor nodes per stack")
    bench.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any other `fastswitch up` setting for the stacks (repeatable), e.g. --set attention=triton",
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.add_argument(
        "--stall-timeout", type=float, default=60.0, help="end a mode's replay after this long without a token"
    )
    bench.set_defaults(func=_cmd_bench)
    return parser


def _missing_extra(command: str, extra: str, names: str) -> int:
    hint = install_hint(extra)
    print(f"fastswitch {command} needs the {extra} extra ({names} not installed): {hint}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else ""
    extra = SERVER_COMMANDS[command][0] if command in SERVER_COMMANDS else ""
    try:
        if extra:
            if absent := missing(extra):
                return _missing_extra(command, extra, ", ".join(absent))
            module = importlib.import_module(SERVER_COMMANDS[command][1])
            if command in SERVICES:
                module.main(argv[1:])
                return 0
        args = build_parser(server=command == "up").parse_args(argv)
        return int(args.func(args) or 0)
    except ModuleNotFoundError as err:
        # The installed metadata cannot tell from a source tree; the failed import can.
        top = (err.name or "").partition(".")[0]
        if extra and top and top not in OWN_PACKAGES:
            return _missing_extra(command, extra, top)
        raise
    except (InvalidRequest, PermissionDenied, Unauthenticated) as err:
        print(f"fastswitch {command}: error: {err}", file=sys.stderr)
        return 2  # what the user sent is wrong (a value, a key, a priority)
    except FastSwitchError as err:
        print(f"fastswitch {command}: {err}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as err:
        print(f"fastswitch {command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
