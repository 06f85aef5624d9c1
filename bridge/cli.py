"""Command line: ``wavespeed-bridge run | check-config | asyncapi | dead-letters |
simulate-api | demo``."""

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
    from bridge.core import jsoncodec
    from bridge.core.webhook_signature import secret_forms

    # The JSON codec: orjson when installed; WAVESPEED_BRIDGE_JSON=stdlib forces the
    # standard library (how the benchmark shows what orjson buys).
    if os.environ.get("WAVESPEED_BRIDGE_JSON") == "stdlib":
        jsoncodec.use("stdlib")

    logs.configure(
        fmt=config.logging.format,
        level=config.logging.level,
        secrets=(api_key, sasl_password, *secret_forms(webhook_secret)),
    )
    tune_gc()
    return asyncio.run(_run(config, api_key, webhook_secret))


# The cyclic collector's first threshold: young objects are collected after this many
# allocations instead of Python's 700. A task's garbage is freed by reference counting;
# the collector ran ~240 times per 8,000 tasks and took a fifth of the core's CPU
# (issue 22, bench/results/cost.md). Cycles (a traceback's frames) wait a little longer.
GC_THRESHOLD = (50_000, 20, 20)


def tune_gc() -> None:
    """What start-up built is never garbage: frozen out of every collection; then the
    collector's thresholds for a daemon that churns short-lived objects."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def cmd_check_config(args: argparse.Namespace) -> int:
    from bridge.config import explain

    config = _load(args.config)
    print(f"{args.config}: ok")
    for line in explain(config):
        print(f"  {line}")
    return 0


def cmd_asyncapi(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bridge.core.asyncapi import Format, document, render

    config = _load(args.config)
    fmt: Format = args.format or ("json" if (args.output or "").endswith(".json") else "yaml")
    text = render(document(config), fmt)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:
        Path(args.output).write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"wavespeed-bridge: {args.output}: cannot write ({exc.strerror})", file=sys.stderr)
        return 1
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


def _dead_letter_options(parser: argparse.ArgumentParser) -> None:
    from bridge.core.messages import DEAD_LETTER_REASONS

    parser.add_argument(
        "--config",
        "-c",
        default=os.environ.get("BRIDGE_CONFIG"),
        help="the bridge's YAML config: Kafka connection, security, dead-letter topic, group",
    )
    parser.add_argument(
        "--reason",
        action="append",
        default=[],
        metavar="R",
        help=f"dlq.reason to select (repeatable): {', '.join(DEAD_LETTER_REASONS)}",
    )
    parser.add_argument(
        "--since", help="dead-lettered at or after: RFC 3339 or a duration ago (30m, 2h, 7d)"
    )
    parser.add_argument("--until", help="dead-lettered before: RFC 3339 or a duration ago")
    parser.add_argument(
        "--offsets",
        action="append",
        default=[],
        metavar="P:FROM-TO",
        help="dead-letter partition and offsets, inclusive (repeatable; P:FROM- to the end)",
    )
    parser.add_argument(
        "--source-topic",
        action="append",
        default=[],
        metavar="TOPIC",
        help="the input topic the records came from (dlq.topic; repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON on stdout")


def cmd_dead_letters(args: argparse.Namespace) -> int:
    import time

    from bridge.core import dead_letters as dl

    try:
        sel = dl.selection(
            reasons=args.reason,
            since=args.since,
            until=args.until,
            offsets=args.offsets,
            source_topics=args.source_topic,
            include_replayed=getattr(args, "include_replayed", False),
            to_topic=getattr(args, "to", None),
            now=time.time(),
        )
    except dl.SelectorError as exc:
        print(f"wavespeed-bridge dead-letters: {exc}", file=sys.stderr)
        return 2
    config = _load(args.config)
    try:
        from bridge.config import read_sasl_password

        read_sasl_password(config.kafka)
    except ConfigError as exc:
        print(f"wavespeed-bridge: {exc}", file=sys.stderr)
        return 2
    from bridge.shell import dead_letters

    options = dead_letters.Options(
        action=args.action,
        json=args.json,
        bucket=getattr(args, "by", "hour"),
        group=getattr(args, "group", None),
        dry_run=getattr(args, "dry_run", False),
    )
    return asyncio.run(dead_letters.command(config, sel, options))


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

    contract = sub.add_parser(
        "asyncapi", help="print the AsyncAPI 3.0 document of the deployment a config describes"
    )
    contract.add_argument(
        "--config",
        "-c",
        default=os.environ.get("BRIDGE_CONFIG"),
        help="YAML config file (default: $BRIDGE_CONFIG; BRIDGE_* env overrides)",
    )
    contract.add_argument(
        "--format", choices=("yaml", "json"), help="default: json for an --output *.json, else yaml"
    )
    contract.add_argument("--output", "-o", metavar="PATH", help="write here, not to stdout")
    contract.set_defaults(func=cmd_asyncapi)

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

    dead = sub.add_parser(
        "dead-letters", help="count the dead-letter topic, or replay dead letters exactly once"
    )
    actions = dead.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="counts by reason, topic, partition and time")
    _dead_letter_options(listing)
    listing.add_argument("--by", choices=("hour", "day"), default="hour", help="time bucket")
    again = actions.add_parser(
        "replay", help="write selected dead letters back to their topics, exactly once"
    )
    _dead_letter_options(again)
    again.add_argument("--dry-run", action="store_true", help="read and count; write nothing")
    again.add_argument(
        "--group", help="the replay's consumer group (default: <group_id>.dead-letters.<hash>)"
    )
    again.add_argument("--to", metavar="TOPIC", help="replay to TOPIC, not each record's own")
    again.add_argument(
        "--include-replayed",
        action="store_true",
        help="also replay records that were replayed before and dead-lettered again",
    )
    for parser_ in (listing, again):
        parser_.set_defaults(func=cmd_dead_letters)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code
