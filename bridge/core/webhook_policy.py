"""Polling as the safety net for webhooks. Pure; times are passed in.

With webhooks on, a task's terminal status usually arrives as a signed delivery, and a poll
is worth sending only once its delivery is overdue. :class:`WebhookAware` wraps the poll
policy and learns per model, from the tasks that finish:

- how often deliveries arrive: the share of the last ``window`` finished tasks whose
  delivery came (a delivery that comes after a poll found the task counts too);
- how late: the ages (from the task's creation) at which deliveries arrived.

While deliveries arrive for at least half of a model's tasks, the first poll of its tasks
is deferred to the 99th percentile of those ages (plus a margin): a lost delivery is found
then; a task still running at that poll is polled again when twice as old, and so on.
When deliveries stop (a misconfigured endpoint, an outage), the share falls, and the
model's tasks are polled on the wrapped policy's own schedule again, by themselves. A
model with no history is polled as without webhooks until deliveries show up.

Deferring is a bet that a delivery can reach this replica, so it is only made while the
replica's webhook feed is live (``live``: it reads every partition of the webhook topic and
keeps up with it). While it is not, every task is polled on the wrapped policy's schedule,
whatever the statistics say; the core moves the polls already deferred (:meth:`base_poll`).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bridge.core.policy import PollPolicy, clamp_to_deadline
from bridge.core.tasks import Task

WINDOW = 50  # finished tasks remembered per model, for the share delivered
AGES = 200  # delivery ages remembered per model, for their 99th percentile
MIN_DELIVERED = 5  # deliveries seen before the policy trusts a model's webhooks
TRUST_SHARE = 0.5  # deliveries per finished task needed to defer polls
MARGIN = 1.2  # ages are stretched by this much, plus
MARGIN_S = 0.25  # this
RECENT = 10_000  # finished tasks remembered for a delivery that comes late


@dataclass(slots=True)
class _Model:
    delivered: collections.deque[bool] = field(
        default_factory=lambda: collections.deque(maxlen=WINDOW)
    )
    ages: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=AGES))
    overdue: float | None = None  # cached p99 age x margin, None: recompute

    def share(self) -> float:
        return sum(self.delivered) / len(self.delivered) if self.delivered else 0.0

    def overdue_age(self) -> float:
        if not self.ages:
            return 0.0
        if self.overdue is None:
            ages = sorted(self.ages)
            p99 = ages[min(len(ages) - 1, math.ceil(0.99 * len(ages)) - 1)]
            self.overdue = p99 * MARGIN + MARGIN_S
        return self.overdue


class WebhookAware:
    """A :class:`~bridge.policy.PollPolicy` that defers polls while webhooks arrive."""

    def __init__(self, base: PollPolicy) -> None:
        self.base = base
        # Whether deliveries can reach this replica (its webhook feed is live). True alone:
        # a policy without a feed (the benchmark) assumes they do; the daemon's feed says.
        self.live = True
        self._models: dict[str, _Model] = {}
        # Every model together: whether deliveries arrive at all is the account's endpoint,
        # so a model without history of its own goes by it (lateness by the wrapped policy).
        self._all = _Model()
        # task id -> (its model, its creation in wall time) of recently finished tasks, for
        # a delivery that comes late; bounded, oldest forgotten.
        self._recent: collections.OrderedDict[str, tuple[str, _Model, float]] = (
            collections.OrderedDict()
        )
        self._changed: set[str] = set()  # models whose statistics moved since learned_models()
        # The wrapped policy's learned completion quantiles, if it learns (the adaptive one).
        self._completion = getattr(base, "completion_quantile", None)
        self._no_history = _Model()  # never written to: overdue from the wrapped policy alone

    # --- PollPolicy ----------------------------------------------------------------------

    def first_poll(self, task: Task, now: float) -> float:
        at = self.base.first_poll(task, now)
        model = self._trusted(task.model)
        if model is None:
            return at
        return clamp_to_deadline(task, max(at, task.created + self._overdue(task, model)), now)

    def next_poll(self, task: Task, now: float) -> float:
        """Trusted: still running at a poll, its delivery is not overdue either; the next
        poll waits until the task is twice as old (few polls, however long the tail)."""
        at = self.base.next_poll(task, now)
        model = self._trusted(task.model)
        if model is None:
            return at
        age = max(self._overdue(task, model), 2.0 * (now - task.created))
        return clamp_to_deadline(task, max(at, task.created + age), now)

    def priority(self, task: Task, due: float) -> float:
        return self.base.priority(task, due)

    def observe(self, task: Task, terminal_poll: float) -> None:
        self.base.observe(task, terminal_poll)

    def model_stats(self) -> dict[str, tuple[float, float]]:
        stats = getattr(self.base, "model_stats", None)
        return stats() if stats is not None else {}

    # --- what webhooks teach ---------------------------------------------------------------

    def finished(self, task: Task, delivered_wall: float | None) -> None:
        """``task`` finished, by a delivery received at ``delivered_wall`` (unix seconds)
        or by a poll (None)."""
        if not task.model:
            return
        model = self._models.setdefault(task.model, _Model())
        self._changed.add(task.model)
        for m in (model, self._all):
            m.delivered.append(delivered_wall is not None)
        if delivered_wall is not None:
            self._age(model, delivered_wall - task.created_wall)
            return
        self._recent[task.task_id] = (task.model, model, task.created_wall)
        if len(self._recent) > RECENT:
            self._recent.popitem(last=False)

    def late(self, task_id: str, delivered_wall: float) -> bool:
        """A delivery for a task a poll already finished: it did arrive, only late."""
        known = self._recent.pop(task_id, None)
        if known is None:
            return False
        name, model, created_wall = known
        self._changed.add(name)
        for m in (model, self._all):  # the newest "not delivered" becomes "delivered"
            for i in range(len(m.delivered) - 1, -1, -1):
                if not m.delivered[i]:
                    m.delivered[i] = True
                    break
        self._age(model, delivered_wall - created_wall)
        return True

    # --- learning shared with other replicas and kept across restarts (core.learning) ------

    def learned_models(self) -> set[str]:
        changed, self._changed = self._changed, set()
        base = getattr(self.base, "learned_models", None)
        return changed | (base() if base is not None else set())

    def learned(self, model: str) -> dict[str, Any] | None:
        """What is learned about ``model``: the wrapped policy's, and how its deliveries
        came (whether, and how late)."""
        base = getattr(self.base, "learned", None)
        out: dict[str, Any] = dict(base(model) or {}) if base is not None else {}
        m = self._models.get(model)
        if m is not None and m.delivered:
            out["webhooks"] = {
                "delivered": list(m.delivered),
                "ages": [round(a, 3) for a in m.ages],
            }
        return out or None

    def learn_from(self, model: str, data: Mapping[str, Any]) -> bool:
        """Take what another replica (or a past run) learned of ``model`` where it knows
        more than this one: the wrapped policy's part, and the deliveries' part."""
        base = getattr(self.base, "learn_from", None)
        took = bool(base(model, data)) if base is not None else False
        hooks = data.get("webhooks")
        if not isinstance(hooks, dict):
            return took
        delivered, ages = hooks.get("delivered"), hooks.get("ages")
        if not (isinstance(delivered, list) and all(isinstance(d, bool) for d in delivered)):
            return took
        if not (isinstance(ages, list) and all(_age_ok(a) for a in ages)):
            return took
        known = self._models.get(model)
        if known is not None and len(known.delivered) >= len(delivered):
            return took
        m = self._models[model] = _Model()
        m.delivered.extend(delivered[-WINDOW:])
        m.ages.extend(float(a) for a in ages[-AGES:])
        if len(self._all.delivered) < len(m.delivered):  # a cold start: the endpoint's too
            self._all.delivered.extend(m.delivered)
        return True

    def base_poll(self, task: Task, now: float) -> float:
        """When the wrapped policy polls ``task`` next (its first poll, or the one after its
        last), and no earlier than ``now``: its schedule as without webhooks."""
        if task.last_poll is None:
            return max(now, self.base.first_poll(task, now))
        return max(now, self.base.next_poll(task, task.last_poll))

    def polls_without(self, task: Task, until: float) -> int:
        """How many polls the wrapped policy would have sent ``task`` by ``until``: what a
        delivery that finished it spared."""
        n, at = 0, self.base.first_poll(task, task.first_seen)
        while at <= until and n < 1000:
            n += 1
            following = self.base.next_poll(task, at)
            if following <= at:  # the deadline: no poll after it
                break
            at = following
        return n

    def trusted(self, model: str | None) -> bool:
        return self._trusted(model) is not None

    def _trusted(self, model: str | None) -> _Model | None:
        """The model's history if deliveries are trusted for it, else None."""
        if not self.live:
            return None  # no delivery can reach this replica now, however reliable they are
        m = self._models.get(model) if model else None
        if m is not None and len(m.ages) >= MIN_DELIVERED:
            return m if m.share() >= TRUST_SHARE else None
        if self._completion is None:
            return None  # lateness would be a guess: poll as without webhooks
        seen = sum(self._all.delivered)
        if seen < MIN_DELIVERED or seen < TRUST_SHARE * len(self._all.delivered):
            return None
        return m if m is not None else self._no_history

    def _overdue(self, task: Task, model: _Model) -> float:
        """When the task's delivery is overdue: the 99th percentile of delivery ages, and no
        earlier than the wrapped policy's own 99th percentile of completion (the first
        deliveries come from the fastest tasks)."""
        overdue = model.overdue_age()
        if self._completion is not None:
            overdue = max(overdue, self._completion(task.model, 0.99) * MARGIN + MARGIN_S)
        return overdue

    @staticmethod
    def _age(model: _Model, age: float) -> None:
        if age > 0 and math.isfinite(age):
            model.ages.append(age)
            model.overdue = None


def _age_ok(age: object) -> bool:
    return isinstance(age, float | int) and not isinstance(age, bool) and 0 < age < 1e7
