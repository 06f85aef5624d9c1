"""Adaptive polling: learn each model's completion time, poll where completions happen.

Pure: times are passed in, randomness is injected, nothing here does I/O.

Learning
    Per model, a histogram of "seconds from ``created_at`` to the terminal status" over
    log-spaced bins (16 per octave, 50 ms to 48 h: 3 KB per model). A completion is only
    known to lie in an interval: after the last poll that saw the task pending and no
    later than the poll that saw it finished. ``timings.inference`` narrows it: the
    completion is queue + inference, inference is exact, so only the queue is unknown.
    The queue's mean is learned per model (online EM for an exponential, from the same
    intervals), and each completion's unit of mass is spread over its interval as that
    queue says: most of it just after creation + inference. Without timings, the mass is
    spread in proportion to the current estimate (one online step of Turnbull's EM for
    interval-censored data) plus a uniform share.

    Old observations decay geometrically, an effective memory of ``learning_window``
    completions; a CUSUM test on the estimated CDF at each new completion catches a
    clear shift (a model twice as slow) within a few dozen and fades the history then.
    A model starts from its class's prior (a lognormal through ``median_s`` and
    ``p90_s``) worth a few completions.

Scheduling
    From the learned distribution (kernel-smoothed in log-time), a dynamic program over
    poll ages minimises the expected ``detection delay + poll_cost_s * polls`` of a task,
    with consecutive polls ``min_interval_s``..``max_interval_s`` apart. It yields a
    feedback policy, the best next poll for any age at which a task was last seen
    pending: sparse while completion is unlikely, dense around the likely completion
    time, backing off in the long tail. Each task follows the plan stretched by its own
    factor within ±``jitter`` (from its id), so a burst submitted together stays spread
    out; no poll is planned past the deadline.

Budget
    :meth:`AdaptivePolicy.priority` ranks due polls by the time at which each task is,
    given what its polls have shown, more likely done than not: when the request budget
    binds, polls go to the tasks most likely finished, or most overdue; deadline polls
    go first.
"""

from __future__ import annotations

import bisect
import fnmatch
import math
import random
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bridge.config import ModelClass, PollingConfig
from bridge.core.tasks import Task

# Bins: [0, 50 ms), then 16 per octave up to two days. Bin k >= 1 is [EDGES[k], EDGES[k+1]).
_B0 = 0.05
_PER_OCTAVE = 16
_LOG_RATIO = math.log(2.0) / _PER_OCTAVE
_MAX_AGE = 2 * 86_400.0
NBINS = 2 + math.ceil(math.log(_MAX_AGE / _B0) / _LOG_RATIO)
EDGES: tuple[float, ...] = (0.0, *(_B0 * math.exp(i * _LOG_RATIO) for i in range(NBINS)))

PRIOR_WEIGHT = 5.0  # the class default counts as this many completions
UNIFORM_SHARE = 0.2  # of each observation, spread evenly over its interval
UNINFORMATIVE = 0.98  # an interval the estimate already gives this much mass teaches nothing
TAIL_EPS = 1e-4  # the plan covers ages between these quantiles; beyond, max_interval
REPLAN_MIN_S = 1.0  # at most one replan per model per second of clock time
PRIORITY_QUANTILE = 0.5  # rank due polls by the conditional median completion
QUEUE_PRIOR = 0.05  # initial mean queue time, as a share of the class median
QUEUE_FLOOR_S = 0.005
CUSUM_K = 0.15  # slack per completion: shifts smaller than this are left to forgetting
CUSUM_H = 4.0  # alarm threshold
FADE = 0.1  # weight left to the history before a detected shift
SUBDIVIDE = 2  # plan ages per histogram bin
DEADLINE_PRIORITY = 1e12  # deadline polls outrank every likelihood-based score

_FALLBACK_CLASS = ModelClass(pattern="*")


def _bin(x: float) -> int:
    if x < _B0:
        return 0
    if x >= EDGES[-1]:
        return NBINS - 1
    k = 1 + int(math.log(x / _B0) / _LOG_RATIO)
    # Rounding can land one bin off at an edge.
    if k < NBINS and x >= EDGES[k + 1]:
        k += 1
    elif x < EDGES[k]:
        k -= 1
    return min(k, NBINS - 1)


def _lognormal_bins(median: float, p90: float) -> list[float]:
    sigma = math.log(p90 / median) / 1.2815515655446004
    mu = math.log(median)
    out = [0.0] * NBINS

    def cdf(x: float) -> float:
        if x <= 0:
            return 0.0
        return 0.5 * math.erfc(-(math.log(x) - mu) / (sigma * math.sqrt(2.0)))

    prev = 0.0
    for k in range(NBINS):
        cur = cdf(EDGES[k + 1])
        out[k] = max(0.0, cur - prev)
        prev = cur
    out[-1] += max(0.0, 1.0 - prev)
    return out


@dataclass(frozen=True, slots=True)
class Plan:
    """The DP solution for one model: a feedback policy over ages since creation."""

    ages: array[float]  # grid of candidate poll ages
    score: array[float]  # t*F(t) - G(t) + W(t): choose the next poll by minimising over it
    cdf_edges: array[float]  # CDF at EDGES, for F at any age and quantiles
    first_age: float  # first poll of a fresh task
    min_interval: float
    max_interval: float

    @property
    def horizon(self) -> float:
        return self.ages[-1]

    def cdf(self, x: float) -> float:
        if x <= 0:
            return 0.0
        k = _bin(x)
        lo, hi = EDGES[k], EDGES[k + 1]
        c0, c1 = self.cdf_edges[k], self.cdf_edges[k + 1]
        return c0 + (c1 - c0) * min(1.0, (x - lo) / (hi - lo))

    def quantile(self, q: float) -> float:
        c = self.cdf_edges
        k = bisect.bisect_left(c, q)
        if k <= 0:
            return 0.0
        if k >= len(c):
            return EDGES[-1]
        c0, c1 = c[k - 1], c[k]
        frac = (q - c0) / (c1 - c0) if c1 > c0 else 1.0
        return EDGES[k - 1] + frac * (EDGES[k] - EDGES[k - 1])

    def conditional_quantile(self, after: float, q: float) -> float:
        """Age by which the task is done with probability ``q``, given pending at ``after``."""
        f = self.cdf(after)
        if f >= 1.0 - 1e-9:
            return after
        return max(after, self.quantile(f + q * (1.0 - f)))

    def next_age(self, after: float) -> float | None:
        """Best next poll age after a poll at age ``after`` saw the task pending."""
        ages, score = self.ages, self.score
        lo = bisect.bisect_left(ages, after + self.min_interval)
        if lo >= len(ages):
            return None  # past the planned horizon: the long tail
        hi = max(lo, bisect.bisect_right(ages, after + self.max_interval) - 1)
        f = self.cdf(after)
        best, best_j = math.inf, lo
        for j in range(lo, hi + 1):
            v = score[j] - ages[j] * f
            if v < best:
                best, best_j = v, j
        return ages[best_j]


def smooth(weights: Sequence[float], n_eff: float) -> list[float]:
    """Gaussian kernel smoothing in log-time, bandwidth by Silverman's rule.

    A few hundred completions leave gaps in a heavy tail; taken literally, a gap says
    "nothing finishes here" and the plan would skip it at the maximum interval.
    """
    w = list(weights)
    total = math.fsum(w)
    if total <= 0 or n_eff <= 1:
        return w
    mean = math.fsum(k * x for k, x in enumerate(w)) / total
    sd = math.sqrt(max(0.0, math.fsum((k - mean) ** 2 * x for k, x in enumerate(w)) / total))
    acc, q25, q75 = 0.0, None, None
    for k, x in enumerate(w):
        acc += x
        if q25 is None and acc >= 0.25 * total:
            q25 = k
        if acc >= 0.75 * total:
            q75 = k
            break
    if q25 is not None and q75 is not None and q75 > q25:
        sd = min(sd, (q75 - q25) / 1.349)
    bw = 0.9 * sd * n_eff**-0.2  # in bins
    if bw < 0.5:
        return w
    radius = math.ceil(3 * bw)
    kernel = [math.exp(-(j * j) / (2 * bw * bw)) for j in range(-radius, radius + 1)]
    norm = math.fsum(kernel)
    kernel = [x / norm for x in kernel]
    out = [0.0] * len(w)
    last = len(w) - 1
    negligible = total * 1e-12
    for k, x in enumerate(w):
        if x <= negligible:
            continue
        for i, g in enumerate(kernel):
            out[min(last, max(0, k + i - radius))] += x * g
    return out


def solve(weights: Sequence[float], poll_cost: float, cls: ModelClass) -> Plan:
    """Dynamic program over poll ages for the distribution ``weights`` (mass per bin).

    With S the survival function, G(t) = ∫₀ᵗ u dF(u) and W(s) the least expected cost
    (times S(s)) of a task known pending at age s::

        W(s) = min over t in [s + min, s + max] of
               poll_cost·S(s) + t·(F(t) - F(s)) - (G(t) - G(s)) + W(t)

    The middle terms are the delay of the tasks finishing in (s, t]. Ages are the
    histogram's edges, plus filler so no gap exceeds half the maximum interval.
    """
    total = math.fsum(weights)
    if total <= 0:
        raise ValueError("empty distribution")
    p = [w / total for w in weights]
    cdf = array("d", [0.0]) * (NBINS + 1)
    mom = [0.0] * (NBINS + 1)
    acc = 0.0
    macc = 0.0
    for k in range(NBINS):
        acc += p[k]
        macc += p[k] * (EDGES[k] + EDGES[k + 1]) / 2.0
        cdf[k + 1] = min(1.0, acc)
        mom[k + 1] = macc
    cdf[NBINS] = 1.0
    k_lo = max(1, bisect.bisect_right(cdf, TAIL_EPS) - 1)
    k_hi = min(NBINS, bisect.bisect_left(cdf, 1.0 - TAIL_EPS))
    min_i, max_i = cls.min_interval_s, cls.max_interval_s
    fill = max_i / 2.0
    ages: list[float] = [0.0]
    for k in range(k_lo, k_hi + 1):
        edge = EDGES[k]
        while edge - ages[-1] > fill:
            ages.append(ages[-1] + fill)
        if k > k_lo and SUBDIVIDE > 1:
            step = (edge - ages[-1]) / SUBDIVIDE
            for i in range(1, SUBDIVIDE):
                ages.append(edge - (SUBDIVIDE - i) * step)
        if edge > ages[-1]:
            ages.append(edge)

    def at(x: float) -> tuple[float, float]:
        k = _bin(x)
        lo, hi = EDGES[k], EDGES[k + 1]
        frac = min(1.0, (x - lo) / (hi - lo))
        return cdf[k] + p[k] * frac, mom[k] + p[k] * frac * (lo + x) / 2.0

    n = len(ages)
    big_f = [0.0] * n
    big_g = [0.0] * n
    for i, x in enumerate(ages):
        big_f[i], big_g[i] = at(x) if x > 0 else (0.0, 0.0)
    score = [0.0] * n
    tail = poll_cost + max_i / 2.0  # per unit of surviving mass beyond the horizon
    last = n - 1
    w_last = (1.0 - big_f[last]) * tail
    score[last] = ages[last] * big_f[last] - big_g[last] + w_last
    first_j = last
    for i in range(n - 2, -1, -1):
        s, f_s = ages[i], big_f[i]
        lo = bisect.bisect_left(ages, s + (min_i if i > 0 else 0.0), i + 1)
        if lo > last:
            w = (1.0 - f_s) * tail
        else:
            hi = max(lo, bisect.bisect_right(ages, s + max_i, i + 1) - 1)
            best, best_j = math.inf, lo
            for j in range(lo, hi + 1):
                v = score[j] - ages[j] * f_s
                if v < best:
                    best, best_j = v, j
            w = poll_cost * (1.0 - f_s) + big_g[i] + best
            if i == 0:
                first_j = best_j
        score[i] = s * f_s - big_g[i] + w
    return Plan(
        ages=array("d", ages),
        score=array("d", score),
        cdf_edges=cdf,
        first_age=ages[first_j],
        min_interval=min_i,
        max_interval=max_i,
    )


class ModelState:
    """What is learned about one model: decaying bin weights and the current plan."""

    __slots__ = (
        "cls",
        "inc",
        "mass",
        "pending",
        "plan",
        "plan_at",
        "queue",
        "seen",
        "shift_down",
        "shift_up",
        "weights",
    )

    def __init__(self, cls: ModelClass, prior: list[float]) -> None:
        self.cls = cls
        self.weights = array("d", (PRIOR_WEIGHT * x for x in prior))
        self.mass = PRIOR_WEIGHT
        # New observations weigh ``inc``, which grows instead of old weights shrinking.
        self.inc = 1.0
        self.seen = 0
        self.pending = 0  # observations since the plan was made
        self.plan: Plan | None = None
        self.plan_at = -math.inf
        self.queue = max(QUEUE_FLOOR_S, QUEUE_PRIOR * cls.median_s)  # mean queue time, seconds
        # CUSUM statistics of the plan's CDF at each completion: uniform while nothing changes.
        self.shift_up = 0.0
        self.shift_down = 0.0

    @property
    def effective(self) -> float:
        return self.mass / self.inc

    def add(self, lo: float, hi: float, window: int, queue: float | None = None) -> bool:
        """Learn that a completion happened in the age interval (lo, hi].

        With ``queue`` (the interval starts where inference started at the latest), the
        mass falls off from ``lo`` like an exponential queue of that mean; otherwise it
        is placed in proportion to the current estimate, plus a uniform share.
        """
        w = self.weights
        k_lo, k_hi = _bin(lo), _bin(hi)
        length = hi - lo
        shares: list[float] = []
        if queue is not None:
            norm = -math.expm1(-length / queue)
            prev = 1.0
            for k in range(k_lo, k_hi + 1):
                cur = math.exp(-(min(hi, EDGES[k + 1]) - lo) / queue)
                shares.append((prev - cur) / norm)
                prev = cur
        else:
            overlaps = [
                max(0.0, min(hi, EDGES[k + 1]) - max(lo, EDGES[k])) for k in range(k_lo, k_hi + 1)
            ]
            prop = [
                w[k_lo + i] * o / (EDGES[k_lo + i + 1] - EDGES[k_lo + i])
                for i, o in enumerate(overlaps)
            ]
            inside = math.fsum(prop)
            if inside >= UNINFORMATIVE * self.mass:
                return False  # already certain: would only displace informative history
            uniform = UNIFORM_SHARE if inside > 0 else 1.0
            for i, o in enumerate(overlaps):
                share = uniform * o / length
                if inside > 0:
                    share += (1.0 - uniform) * prop[i] / inside
                shares.append(share)
        inc = self.inc
        for i, share in enumerate(shares):
            w[k_lo + i] += inc * share
        self.mass += inc
        self.inc = inc / (1.0 - 1.0 / max(2, window))
        if self.inc > 1e12:  # keep the numbers in range
            scale = 1.0 / self.inc
            for k in range(NBINS):
                w[k] *= scale
            self.mass *= scale
            self.inc = 1.0
        self.seen += 1
        self.pending += 1
        return True

    def detect_shift(self, u: float) -> bool:
        """Feed the estimated CDF at a new completion; on a clear shift, fade the history.

        Forgetting alone needs about a window's worth of completions to follow a model that
        became twice as slow; a CUSUM test on these values (uniform when the estimate is
        right) notices within a couple of dozen, and old history then drops to ``FADE``.
        """
        self.shift_up = max(0.0, self.shift_up + u - 0.5 - CUSUM_K)
        self.shift_down = max(0.0, self.shift_down + 0.5 - u - CUSUM_K)
        if max(self.shift_up, self.shift_down) < CUSUM_H:
            return False
        w = self.weights
        for k in range(NBINS):
            w[k] *= FADE
        self.mass *= FADE
        self.shift_up = self.shift_down = 0.0
        self.plan_at = -math.inf  # replan at the next chance
        self.pending = max(self.pending, 1 << 20)
        return True

    def learn_queue(self, lo: float, hi: float, window: int) -> None:
        """One online EM step for the mean queue time, known to lie in (lo, hi].

        The queue (creation to the start of inference) is modelled as exponential; the
        update moves the mean toward its expectation given the interval.
        """
        mu = self.queue
        span = hi - lo
        if span <= 0:
            return
        x = span / mu
        expected = lo + mu - (span / math.expm1(x) if x < 700 else 0.0)
        self.queue = max(QUEUE_FLOOR_S, mu + (expected - mu) / max(2, window))

    def quantiles(self, *qs: float) -> tuple[float, ...]:
        w = self.weights
        out: list[float] = []
        acc = 0.0
        k = 0
        for q in sorted(qs):
            target = q * self.mass
            while k < NBINS and acc + w[k] < target:
                acc += w[k]
                k += 1
            if k >= NBINS:
                out.append(EDGES[-1])
                continue
            frac = (target - acc) / w[k] if w[k] > 0 else 0.0
            out.append(EDGES[k] + frac * (EDGES[k + 1] - EDGES[k]))
        return tuple(out)


class AdaptivePolicy:
    """Learned, per-model poll schedules; implements :class:`bridge.policy.PollPolicy`."""

    def __init__(
        self,
        *,
        model_classes: tuple[ModelClass, ...] = (),
        poll_cost_s: float = 0.5,
        learning_window: int = 200,
        jitter: float = 0.1,
        max_models: int = 1000,
        rng: random.Random | None = None,
    ) -> None:
        if poll_cost_s <= 0 or learning_window < 1 or max_models < 1 or not 0 <= jitter < 1:
            raise ValueError("invalid adaptive policy settings")
        self.classes = tuple(model_classes) or (_FALLBACK_CLASS,)
        self.poll_cost = poll_cost_s
        self.window = learning_window
        self.jitter = jitter
        self.max_models = max_models
        self._rng = rng or random.Random()
        self._models: OrderedDict[str, ModelState] = OrderedDict()
        self._priors: dict[ModelClass, list[float]] = {}
        self._changed: set[str] = set()  # models that learned since learned_models()

    @classmethod
    def from_config(
        cls, config: PollingConfig, *, rng: random.Random | None = None
    ) -> AdaptivePolicy:
        return cls(
            model_classes=config.model_classes,
            poll_cost_s=config.poll_cost_s,
            learning_window=config.learning_window,
            jitter=config.jitter,
            max_models=config.max_models,
            rng=rng,
        )

    # --- model state -------------------------------------------------------------------

    def model_class(self, model: str | None) -> ModelClass:
        name = model or ""
        for c in self.classes:
            if fnmatch.fnmatchcase(name, c.pattern):
                return c
        return self.classes[-1]

    def _state(self, model: str | None) -> ModelState:
        name = model or ""
        state = self._models.get(name)
        if state is not None:
            self._models.move_to_end(name)
            return state
        cls = self.model_class(model)
        prior = self._priors.get(cls)
        if prior is None:
            prior = self._priors[cls] = _lognormal_bins(cls.median_s, cls.p90_s)
        state = self._models[name] = ModelState(cls, prior)
        while len(self._models) > self.max_models:
            self._models.popitem(last=False)  # least recently used model is forgotten
        return state

    def plan(self, model: str | None, now: float) -> Plan:
        """The model's current plan, recomputed when enough has been learned since."""
        state = self._state(model)
        plan = state.plan
        if plan is None or (
            state.pending >= max(1.0, state.effective / 20.0)
            and now - state.plan_at >= REPLAN_MIN_S
        ):
            plan = state.plan = solve(
                smooth(state.weights, state.effective), self.poll_cost, state.cls
            )
            state.plan_at = now
            state.pending = 0
        return plan

    # --- the PollPolicy protocol ---------------------------------------------------------

    def _stretch(self, task: Task) -> float:
        """A per-task time scale within ±jitter, fixed by the task id.

        Optimal schedules pull tasks back to the same ages (the best next poll depends
        little on when the last one was), so jitter on each interval alone would not keep
        a burst apart; following the plan stretched by a factor of its own, each task stays
        in its lane, poll after poll. The id fixes it, so no per-task state is needed.
        """
        if not self.jitter:
            return 1.0
        u = zlib.crc32(task.task_id.encode()) / 4294967296.0
        return 1.0 + self.jitter * (2.0 * u - 1.0)

    def _jittered(self, delay: float) -> float:
        # A little noise on top, so tasks whose ids give nearly the same stretch do not
        # poll in lockstep either.
        if not self.jitter or delay <= 0:
            return delay
        half = self.jitter / 2.0
        return delay * (1.0 + self._rng.uniform(-half, half))

    @staticmethod
    def _before_deadline(task: Task, at: float, now: float, min_interval: float) -> float:
        # A poll so close to the deadline that the deadline poll would crowd it is merged
        # into the deadline poll; only a deadline nearer than min_interval forces a short gap.
        if at + min_interval > task.deadline:
            at = task.deadline
        return max(now, at)

    def first_poll(self, task: Task, now: float) -> float:
        plan = self.plan(task.model, now)
        at = task.created + plan.first_age * self._stretch(task)
        if at <= now:
            return now  # created long ago (backlog, restart): it may be done already
        delay = min(self._jittered(at - now), plan.max_interval)
        return self._before_deadline(task, now + delay, now, 0.0)

    def next_poll(self, task: Task, now: float) -> float:
        plan = self.plan(task.model, now)
        stretch = self._stretch(task)
        age = plan.next_age((now - task.created) / stretch)
        delay = plan.max_interval if age is None else task.created + age * stretch - now
        delay = self._jittered(delay)
        delay = min(plan.max_interval, max(plan.min_interval, delay))
        return self._before_deadline(task, now + delay, now, plan.min_interval)

    def priority(self, task: Task, due: float) -> float:
        if due >= task.deadline:
            return DEADLINE_PRIORITY - task.deadline  # earliest deadline first
        plan = self.plan(task.model, due)
        after = 0.0
        if task.last_pending_poll is not None:
            after = max(0.0, task.last_pending_poll - task.created)
        # A fixed point in time, so due polls keep a consistent order however long they wait.
        return -(task.created + plan.conditional_quantile(after, PRIORITY_QUANTILE))

    def observe(self, task: Task, terminal_poll: float) -> None:
        if not task.model:
            return
        hi = min(terminal_poll - task.created, _MAX_AGE)
        if hi <= 0:
            return  # clock skew: nothing we can place
        pending = 0.0
        if task.last_pending_poll is not None:
            pending = max(0.0, task.last_pending_poll - task.created)
        state = self._state(task.model)
        plan = state.plan
        inference_ms = getattr(task.prediction, "inference_ms", None)
        if isinstance(inference_ms, int | float) and 0 <= inference_ms / 1000.0 < hi:
            # Completion = queue + inference, and inference is reported exactly: only the
            # queue is unknown, in (pending - inference, hi - inference].
            inference = inference_ms / 1000.0
            state.learn_queue(max(0.0, pending - inference), hi - inference, self.window)
            lo = min(max(pending, inference), hi * (1.0 - 1e-9))
            if plan is not None:
                state.detect_shift(plan.cdf(min(hi, lo + state.queue)))
            if state.add(lo, hi, self.window, queue=state.queue):
                self._changed.add(task.model)
            return
        lo = min(pending, hi * (1.0 - 1e-9))
        if plan is not None:
            state.detect_shift(plan.cdf((lo + hi) / 2.0))
        if state.add(lo, hi, self.window):
            self._changed.add(task.model)

    # --- introspection -----------------------------------------------------------------

    def model_stats(self) -> dict[str, tuple[float, float]]:
        """Learned (median_s, p90_s) per model that has completed at least one task."""
        out: dict[str, tuple[float, float]] = {}
        for name, state in self._models.items():
            if state.seen and name:
                median, p90 = state.quantiles(0.5, 0.9)
                out[name] = (median, p90)
        return out

    def completion_quantile(self, model: str | None, q: float) -> float:
        """The ``q`` quantile of a model's completion age as learned so far (or its class's
        prior): how long its tasks take."""
        return self._state(model).quantiles(q)[0]

    def observations(self, model: str) -> int:
        state = self._models.get(model)
        return state.seen if state is not None else 0

    # --- learning shared with other replicas and kept across restarts (core.learning) ------

    def learned_models(self) -> set[str]:
        """The models that learned something since the last call."""
        changed, self._changed = self._changed, set()
        return {m for m in changed if m in self._models}

    def learned(self, model: str) -> dict[str, Any] | None:
        """What is learned about ``model``, as plain data: the histogram's weights (sparse,
        scaled so that new observations weigh 1), completions seen, the queue's mean."""
        state = self._models.get(model)
        if state is None or not state.seen:
            return None
        inc, eff = state.inc, state.effective
        weights = {
            str(k): round(w / inc, 9) for k, w in enumerate(state.weights) if w > 1e-9 * eff * inc
        }
        return {"bins": NBINS, "weights": weights, "seen": state.seen, "queue": state.queue}

    def learn_from(self, model: str, data: Mapping[str, Any]) -> bool:
        """Take ``data`` (from :meth:`learned`, another replica's or a past run's) as what is
        known of ``model`` if it has seen more completions than this replica has."""
        weights, seen, queue = data.get("weights"), data.get("seen"), data.get("queue")
        if data.get("bins") != NBINS or not isinstance(weights, dict):
            return False  # another binning: not comparable
        if not isinstance(seen, int) or isinstance(seen, bool) or seen < 1:
            return False
        if not isinstance(queue, float | int) or not 0 < queue < _MAX_AGE:
            return False
        values = array("d", bytes(8 * NBINS))
        for key, w in weights.items():
            if not (isinstance(key, str) and key.isdigit() and 0 <= int(key) < NBINS):
                return False
            if not isinstance(w, float | int) or not 0 <= w < 1e15:
                return False
            values[int(key)] = float(w)
        mass = math.fsum(values)
        if not mass > 0 or (model in self._models and self._models[model].seen >= seen):
            return False
        state = self._state(model)
        state.weights, state.mass, state.inc = values, mass, 1.0
        state.seen, state.queue = seen, max(QUEUE_FLOOR_S, float(queue))
        state.plan, state.plan_at, state.pending = None, -math.inf, 0
        state.shift_up = state.shift_down = 0.0
        return True
