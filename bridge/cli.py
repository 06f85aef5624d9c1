"""Command line: ``wavespeed-bridge run | check-config | simulate-api | demo``."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence

from bridge import __version__
from bridge.config import Config, ConfigError, load_config, read_api_key


def _install_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def _load(path: str | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"wavespeed-bridge: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


async def _run(config: Config, api_key: str | None, webhook_secret: str | None) -> int:
    from bridge.shell.app import Bridge

    bridge = Bridge(config, api_key=api_key, webhook_secret=webhook_secret)
    stop = asyncio.Event()
    _install_signals(stop)
    await bridge.run(stop)
    return bridge.exit_code


def cmd_run(args: argparse.Namespace) -> int:
    from bridge.edges import logs

    config = _load(args.config)
    try:
        api_key = read_api_key(config.api, os.environ)
        from bridge.config import read_sasl_password, read_webhook_secret

        sasl_password = read_sasl_password(config.kafka)
        webhook_secret = (
            read_webhook_secret(config.webhooks, os.environ) if config.webhooks.enabled else None
        )
    except ConfigError as exc:
        print(f"wavespeed-bridge: {exc}", file=sys.stderr)
        return 2
    if not api_key:
        print(
            f"wavespeed-bridge: no API key: set {config.api.api_key_env} or api.api_key_file",
            file=sys.stderr,
        )
        return 2
    if config.webhooks.enabled and not webhook_secret:
        print(
            f"wavespeed-bridge: webhooks.enabled but no webhook secret: set"
            f" {config.webhooks.secret_env} or webhooks.secret_file (the whsec_... string from"
            " GET /api/v3/webhook/secret)",
            file=sys.stderr,
        )
        return 2
    from bridge.core.webhook_signature import secret_forms

    logs.configure(
        fmt=config.logging.format,
        level=config.logging.level,
        secrets=(api_key, sasl_password, *secret_forms(webhook_secret)),
    )
    return asyncio.run(_run(config, api_key, webhook_secret))


def cmd_check_config(args: argparse.Namespace) -> int:
    from bridge.config import explain

    config = _load(args.config)
    print(f"{args.config}: ok")
    for line in explain(config):
        print(f"  {line}")
    return 0


LOCAL_STACK_MISSING = (
    "wavespeed-bridge: the local stack (simulator, brokers, demo) is not installed: it ships"
    " with the source checkout only, not the wheel or the image. From a clone:"
    " pip install -e '.[dev]'"
)


def _local_stack() -> bool:
    import importlib.util

    if importlib.util.find_spec("bridge.local") is None:
        print(LOCAL_STACK_MISSING, file=sys.stderr)
        return False
    return True


def cmd_simulate_api(args: argparse.Namespace) -> int:
    if not _local_stack():
        return 2
    from bridge.local.simulator import Simulator

    key = os.environ.get(args.api_key_env) or None

    async def main() -> None:
        sim = Simulator(api_key=key, host=args.host, port=args.port, seed=args.seed)
        if args.account_limit:
            sim.set_faults(requests_per_second=args.account_limit)
        stop = asyncio.Event()
        _install_signals(stop)
        await sim.start()
        print(
            f"WaveSpeed API simulator on {sim.base_url} (auth {'on' if key else 'off'})", flush=True
        )
        try:
            await stop.wait()
        finally:
            await sim.stop()

    asyncio.run(main())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if not _local_stack():
        return 2
    from bridge.local.demo import run_demo

    return asyncio.run(
        run_demo(
            tasks=args.tasks,
            config_path=args.config,
            keep_running=args.keep_running,
            broker_kind=args.broker,
        )
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wavespeed-bridge",
        description="Kafka bridge for WaveSpeedAI predictions.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the bridge daemon")
    run.add_argument(
        "--config",
        "-c",
        default=os.environ.get("BRIDGE_CONFIG"),
        help="YAML config file (default: $BRIDGE_CONFIG; BRIDGE_* env overrides)",
    )
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a config file without connecting")
    check.add_argument("config")
    check.set_defaults(func=cmd_check_config)

    sim = sub.add_parser("simulate-api", help="serve the WaveSpeed API simulator")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8080)
    sim.add_argument("--seed", type=int, default=None)
    sim.add_argument(
        "--api-key-env",
        default="WAVESPEED_API_KEY",
        help="environment variable holding the key to require (unset: no auth)",
    )
    sim.add_argument(
        "--account-limit",
        type=float,
        default=0.0,
        help="the account's requests/s, all clients together; above it a 429 (0: none)",
    )
    sim.set_defaults(func=cmd_simulate_api)

    demo = sub.add_parser("demo", help="local stack: broker, simulator, bridge and a feeder")
    demo.add_argument("--tasks", type=int, default=40)
    demo.add_argument(
        "--broker",
        choices=("tansu", "kafka"),
        default="tansu",
        help="tansu (in memory, starts at once) or kafka (Apache Kafka; needs Java 17, Maven)",
    )
    demo.add_argument("--config", default="config/local.yaml")
    demo.add_argument(
        "--keep-running",
        action="store_true",
        help="keep the stack up after the last event (Ctrl-C to stop)",
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code
