"""The daemon: the pure core (``bridge.core``) wired to Kafka and the result API by its loops.

- intake: consume → ``core.on_record`` → dead letters published, polls scheduled;
- dispatch: due polls → GET → ``core.on_outcome`` → events published;
- the delivery mode (``bridge.shell.delivery``, at least once or exactly once): events
  out until acknowledged → ``core.acknowledged`` marks their input offsets done, and the
  commits;
- commits: the mode's commit on a fixed cadence, and the gauges;
- health: the broker probe behind ``/readyz``, missing topics, the group membership;
- webhooks (when on): the receiver and the webhook topic's feed.

What the core returns goes through one router (``delivery.Effects``); rebalances through
``rebalance``; facts become logs and metrics in ``telemetry``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
import uuid

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

from bridge import __version__
from bridge.config import Config
from bridge.core import jsoncodec
from bridge.core.book import Core, Partition
from bridge.core.clock import Clock, SystemClock
from bridge.core.membership import Membership, State, deadline_s
from bridge.core.policy import FixedInterval, PollPolicy, retry_delay
from bridge.core.tasks import Task
from bridge.core.webhook_policy import WebhookAware
from bridge.edges import kafka as kafka_io
from bridge.edges.api import ApiClient
from bridge.edges.metrics import Metrics
from bridge.edges.server import HealthServer
from bridge.edges.tracing import Tracing
from bridge.edges.webhook_server import WebhookServer, kafka_publish
from bridge.shell.at_least_once import AtLeastOnce, Publisher
from bridge.shell.bounded import StartupTimeout, bounded, cancel_all, startup_limit_s
from bridge.shell.cluster import Cluster
from bridge.shell.commits import CommitLoop
from bridge.shell.delivery import DeliveryMode, Effects
from bridge.shell.dispatch import Dispatcher
from bridge.shell.exactly_once import ExactlyOnce
from bridge.shell.health import KafkaHealth
from bridge.shell.intake import Intake
from bridge.shell.rebalance import Rebalance
from bridge.shell.telemetry import Telemetry
from bridge.shell.webhook_feed import WebhookFeed

log = structlog.get_logger("wavespeed_bridge")


def make_policy(config: Config, rng: random.Random | None = None) -> PollPolicy:
    p = config.polling
    base: PollPolicy
    if p.policy == "adaptive":
        from bridge.core.adaptive import AdaptivePolicy

        base = AdaptivePolicy.from_config(p, rng=rng)
    else:
        base = FixedInterval(p.interval_s, jitter=p.jitter, rng=rng)
    # With webhooks, polls wait until a task's delivery is overdue (see webhook_policy).
    return WebhookAware(base) if config.webhooks.enabled else base


class Bridge:
    """One bridge process. ``await bridge.run(stop)`` until ``stop`` is set."""

    def __init__(
        self,
        config: Config,
        *,
        api_key: str | None,
        webhook_secret: str | None = None,
        clock: Clock | None = None,
        policy: PollPolicy | None = None,
        metrics: Metrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self.policy = policy or make_policy(config, self.rng)
        self.metrics = metrics or Metrics(
            max_model_labels=config.polling.max_model_labels,
            version=__version__,
            max_tenant_labels=config.tenants.max_labels,
            named_tenants=[r.tenant for r in config.tenants.rules],
        )
        self.core = Core(config, policy=self.policy, rng=self.rng, now=self.clock.monotonic())
        self.tracing = Tracing.start(config)
        self.telemetry = Telemetry(
            self.metrics, self.core, self.tracing, now=self.clock.monotonic()
        )
        self.effects = Effects(self.telemetry)  # what the core returns goes through it
        self.api = ApiClient.from_config(config.api, api_key)
        w = config.webhooks
        self.kafka = KafkaHealth(
            config.kafka, self.metrics, frozenset({w.topic}) if w.enabled else frozenset()
        )
        self.webhook_secret = webhook_secret
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.webhook_server: WebhookServer | None = None
        self.webhook_feed: WebhookFeed | None = None
        self.server = HealthServer(
            host=config.server.host,
            port=config.server.port,
            registry=self.metrics.registry,
            ready=self.readiness,
            alive=self.liveness,
        )
        self._stopping = self._started = self._assigned_once = False
        # Exit status of run(): 3 when this member waited past its deadline for an
        # assignment, so that the orchestrator starts a fresh one; 1 if start-up hung.
        self.exit_code = 0
        self.membership = Membership(deadline_s(config.kafka), self.clock.monotonic())
        self._stop: asyncio.Event | None = None
        self._committer: CommitLoop | None = None
        self._mode: DeliveryMode | None = None
        self._dispatcher: Dispatcher | None = None
        self._intake: Intake | None = None
        self._listener: Rebalance | None = None
        self.cluster: Cluster | None = None

    # --- state, for probes and tests ---------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        if self._stopping:
            return False, "shutting down"
        if self.kafka.problem is not None or self._started:
            why = self.kafka.reason()
            if why is not None:
                return False, why
        if not self._started:
            return False, "starting"
        if not self._assigned_once:
            return False, "waiting for group assignment"
        return True, "ready"

    def liveness(self) -> tuple[bool, str]:
        # The event loop is alive if the commit loop ticked recently.
        tick = self._committer.last_tick if self._committer is not None else None
        stale = 0.0 if tick is None else time.monotonic() - tick
        limit = max(30.0, 10 * self.config.kafka.commit_interval_s)
        return (stale < limit, f"loop tick {stale:.1f}s ago")

    @property
    def open_records(self) -> int:
        return self.core.open_records

    @property
    def tasks(self) -> dict[str, Task]:
        """Tasks being polled, by id."""
        return self.core.polling()

    @property
    def publishing(self) -> dict[str, Task]:
        """Tasks whose event waits for the broker's acknowledgement, by id."""
        return self.core.publishing()

    # --- run -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        self._stop = stop
        await self.server.start()
        log.info(
            "starting",
            version=__version__,
            input_topic=cfg.kafka.input_topic,
            group_id=cfg.kafka.group_id,
            api=cfg.api.base_url,
            policy=cfg.polling.policy,
            metrics=f"http://{cfg.server.host}:{self.server.port}/metrics",
            json=jsoncodec.backend_in_use(),
        )
        clients: kafka_io.Clients | None = None
        try:
            clients = await self.kafka.connect(stop)
            if clients is not None:
                await self._serve(*clients, stop)
        except StartupTimeout as exc:  # said where it expired; a restart may do better
            log.error("start-up did not complete, exiting", waited_for=str(exc))
            self.exit_code = 1
        finally:
            await self._close(clients)

    async def _serve(
        self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer, stop: asyncio.Event
    ) -> None:
        cfg, m, core = self.config, self.metrics, self.core
        effects = self.effects
        mode = self._mode = self._delivery_mode(consumer, producer)
        dispatcher = self._dispatcher = Dispatcher(
            core=core,
            api=self.api,
            effects=effects,
            telemetry=self.telemetry,
            clock=self.clock,
            max_requests=cfg.api.max_concurrent_requests,
        )
        intake = self._intake = Intake(
            consumer,
            core=core,
            effects=effects,
            mode=mode,
            config=cfg,
            clock=self.clock,
            metrics=m,
            wake_dispatch=dispatcher.wake,
        )
        committer = self._committer = CommitLoop(
            consumer,
            mode,
            core=core,
            telemetry=self.telemetry,
            clock=self.clock,
            interval_s=cfg.kafka.commit_interval_s,
        )
        listener = self._listener = Rebalance(
            core=core,
            intake=intake,
            mode=mode,
            effects=effects,
            on_revoked=lambda: self.membership.revoked(self.clock.monotonic()),
            on_assigned=self._assigned,
        )
        self.membership = Membership(deadline_s(cfg.kafka), self.clock.monotonic())
        self.metrics.group_join_deadline.set(self.membership.deadline_s)
        # What the other replicas learned is read before any partition is taken.
        cluster = self.cluster = await self._start_cluster(producer)
        consumer.subscribe([cfg.kafka.input_topic], listener=listener)
        feed = await self._start_webhooks(producer) if cfg.webhooks.enabled else None
        self._started = True
        loops = [
            asyncio.create_task(intake.run(), name="consume"),
            asyncio.create_task(dispatcher.run(), name="dispatch"),
            asyncio.create_task(committer.run(), name="commit"),
            asyncio.create_task(self._health_loop(producer), name="health"),
        ]
        if feed is not None:
            loops.append(asyncio.create_task(feed.run(), name="webhooks"))
        if cluster is not None:
            loops.append(asyncio.create_task(cluster.run(), name="cluster"))
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([stopper, *loops], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stopper and t.exception() is not None:
                    log.error("loop failed", loop=t.get_name(), exc_info=t.exception())
            await self._shutdown([*loops, stopper])
        finally:
            if self.webhook_server is not None:
                await self.webhook_server.stop()
            if feed is not None:
                await feed.close()

    def _delivery_mode(
        self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer
    ) -> DeliveryMode:
        """The one place that knows both modes exist (``delivery`` in the config)."""
        cfg, m = self.config, self.metrics
        mode: DeliveryMode
        if cfg.delivery == "exactly_once":

            async def restart(part: Partition) -> None:
                assert self._intake is not None
                await self._intake.restart(part)

            def fenced(part: Partition, epoch: int) -> None:
                assert self._intake is not None
                self._intake.fenced(part, epoch)

            mode = ExactlyOnce(
                consumer,
                core=self.core,
                effects=self.effects,
                clock=self.clock,
                config=cfg,
                metrics=m,
                restart=restart,
                fenced=fenced,
            )
        else:
            # Publishes from its own coroutine, which outlives the other loops: finished
            # events still go out during shutdown.
            publisher = Publisher(
                producer,
                retry_delay=lambda attempt: retry_delay(attempt, 0.5, 10.0, self.rng),
                on_error=m.publish_failures.inc,
            )
            m.events_pending.set_function(lambda: publisher.pending)
            mode = AtLeastOnce(
                consumer,
                publisher,
                core=self.core,
                effects=self.effects,
                clock=self.clock,
                config=cfg,
                metrics=m,
            )
        self.effects.mode = mode
        return mode

    async def _start_cluster(self, producer: AIOKafkaProducer) -> Cluster | None:
        """The coordination and state topics' loop (``bridge.shell.cluster``), if any."""
        cfg = self.config
        if cfg.cluster.coordination_topic is None and cfg.cluster.state_topic is None:
            return None
        limit = startup_limit_s(cfg.kafka)
        reader = kafka_io.make_reader(cfg.kafka)
        try:
            await bounded(reader.start(), limit, "the cluster topics' reader to connect")
        except TimeoutError:
            raise StartupTimeout("the cluster topics' reader") from None
        cluster = Cluster(
            reader,
            producer,
            core=self.core,
            effects=self.effects,
            clock=self.clock,
            config=cfg,
            metrics=self.metrics,
            replica=self.replica,
        )
        # Failing, it is looked for again while running (the safe share, cold learning).
        with contextlib.suppress(TimeoutError, KafkaError):
            await bounded(cluster.start(limit), limit + 1.0, "the cluster topics")
        self.effects.listeners.append(cluster.note)
        return cluster

    async def _start_webhooks(self, producer: AIOKafkaProducer) -> WebhookFeed:
        """The receiver (deliveries into the webhook topic) and the topic's reader."""
        cfg = self.config
        if not self.webhook_secret:
            raise RuntimeError("webhooks.enabled needs the webhook secret")
        limit = startup_limit_s(cfg.kafka)
        reader = kafka_io.make_reader(cfg.kafka)
        assert self._dispatcher is not None
        feed = self.webhook_feed = WebhookFeed(
            reader,
            producer,
            core=self.core,
            effects=self.effects,
            clock=self.clock,
            config=cfg,
            replica=self.replica,
            wake_dispatch=self._dispatcher.wake,  # polls it moves when not live are due now
            on_partitions=self.metrics.webhook_feed_partitions.set,
        )
        try:
            await bounded(reader.start(), limit, "the webhook topic's reader to connect")
            await bounded(feed.start(), limit, "the webhook topic's partitions and offsets")
        except TimeoutError:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader.stop(), 5.0)
            raise StartupTimeout("the webhook topic's reader") from None
        self.effects.listeners.append(feed.note)
        self.webhook_server = WebhookServer(
            cfg.webhooks,
            secret=self.webhook_secret,
            publish=kafka_publish(producer, cfg.webhooks.topic),
            metrics=self.metrics,
            clock=self.clock,
            replica=self.replica,
            tracing=self.tracing,
        )
        try:
            await bounded(self.webhook_server.start(), limit, "the webhook receiver to listen")
        except TimeoutError:
            await feed.close()
            raise StartupTimeout("the webhook receiver") from None
        self.metrics.webhooks_enabled.set(1)
        log.info(
            "webhook receiver listening",
            url=f"http://{cfg.webhooks.host}:{self.webhook_server.port}{cfg.webhooks.path}",
            topic=cfg.webhooks.topic,
        )
        return feed

    def _assigned(self) -> None:
        self._assigned_once = True
        self.membership.assigned(self.clock.monotonic())

    def _watch_membership(self) -> None:
        """Metrics of this member's place in the group; exit when it waited too long."""
        now = self.clock.monotonic()
        verdict = self.membership.check(now, self.kafka.ok)
        self.metrics.group_unassigned.set(verdict.waited_s)
        self.metrics.rebalances_per_minute.set(self.membership.rebalances_per_minute(now))
        if verdict.state is State.STUCK and self.exit_code == 0:
            log.error(
                "no group assignment in time, exiting so that a fresh member joins",
                waited_s=round(verdict.waited_s, 1),
                deadline_s=self.membership.deadline_s,
                group_id=self.config.kafka.group_id,
                exit_code=3,
            )
            self.exit_code = 3
            if self._stop is not None:
                self._stop.set()

    async def _health_loop(
        self,
        producer: AIOKafkaProducer,
    ) -> None:
        input_topic = self.config.kafka.input_topic
        held: frozenset[str] = frozenset()
        while not self._stopping:
            missing = await self.kafka.probe(producer) - {input_topic}
            if missing != held and self._mode is not None:  # told of changes only
                held = missing
                self._mode.hold_topics(held)
            self.metrics.ready.set(1 if self.readiness()[0] else 0)
            self._watch_membership()
            await asyncio.sleep(self.config.kafka.health_check_interval_s)

    async def _shutdown(self, loops: list[asyncio.Task[object]]) -> None:
        """Stop fetching and polling; publish and commit what is finished, within the grace."""
        assert self._dispatcher is not None and self._mode is not None
        assert self._committer is not None and self._intake is not None
        self._stopping = True
        self.metrics.ready.set(0)
        grace_end = time.monotonic() + self.config.shutdown_grace_s
        log.info("stopping", in_flight=len(self.tasks), publishing=len(self.publishing))
        if self._listener is not None:  # a rebalance under way ends before what follows
            await self._listener.close(self.config.shutdown_grace_s / 2)
        # Python 3.11's wait_for can swallow a cancel that races its inner task: cancel_all
        # cancels a loop still running again (the flags stop these three sooner).
        self._intake.running = self._dispatcher.running = self._committer.running = False
        self._dispatcher.wake()
        await cancel_all(loops)
        # Polls under way may still turn into events: let them land, then deliver.
        await self._dispatcher.finish(grace_end - time.monotonic() - 1.0)
        everything = set(self.core.active_partitions())
        await self._mode.hand_over(everything, max(0.5, grace_end - time.monotonic() - 0.5))
        if self.cluster is not None:  # its share to the others, what it learned to the topic
            await self.cluster.close(max(0.5, min(2.0, grace_end - time.monotonic())))
        unfinished = len(self.tasks) + len(self.publishing)
        self.effects.apply(self.core.release(everything, "shutdown"))
        log.info(
            "stopped",
            unfinished=unfinished,
            note="unfinished tasks stay uncommitted and are polled again after restart",
        )

    async def _close(self, clients: kafka_io.Clients | None) -> None:
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        if self._mode is not None:
            self._mode.close()
        if clients is not None:
            for client in clients:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.stop(), 5.0)
        await self.api.aclose()
        await self.server.stop()
        if self.tracing.enabled:  # the spans still batched, within the SDK's own timeouts
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.to_thread(self.tracing.shutdown), 10.0)
