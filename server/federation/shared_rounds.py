"""Independent fits that share federated rounds.

Fits of a study that do not depend on each other — the main fit and every
leave-one-site-out refit, the clinical screening beside the radiomics selection, the
calibration fits of each split — run as *lanes*: each is a transport of its own, driven
by the code it always had, in a thread of its own. A round goes out when every lane has
either asked or finished; each site then receives, in one message, the requests of
every lane that asked it (a batch, which it judges, answers and audits item by item as
if each had come alone). Lanes move in lockstep, so which requests share a round is
fixed by the study alone and a run's round counts are reproducible; each lane sees
exactly the replies it would see running alone, so results do not change.

Rounds are counted where they happen: the transport the lanes were started from counts
each round once, under the phase of its first lane (the main fit before the refits),
or under a lane's ``tally`` ("external" for the leave-one-site-out refits).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from radfed.server.federation.transport import UNAVAILABLE, SiteSubset, Transport
from radfed.shared.errors import FederationError
from radfed.shared.messages import Payload, pack, unpack

T = TypeVar("T")

#: Whether the lanes of :func:`together` share rounds (False: one lane after another,
#: each in rounds of its own; for comparisons, as the tests do).
SHARE = True

RUNNING, PENDING, INFLIGHT, WAITING, DONE = "running", "pending", "in flight", "waiting", "done"
QUEUED = "queued"  # not started yet (lanes taking turns, SHARE = False)


class Cancelled(FederationError):
    """Another fit of the same group failed, so this one was abandoned."""


class _Call:
    """One :func:`together` call: its lanes, and whether they were cancelled."""

    def __init__(self, owner: Lane | None) -> None:
        self.owner = owner
        self.lanes: list[Lane] = []
        self.cancelled = False

    @property
    def abandoned(self) -> bool:
        return self.cancelled or (self.owner is not None and self.owner.call.abandoned)


class _Group:
    """Lanes sending through one transport, and the rounds they shared."""

    def __init__(self, deliverer: Transport) -> None:
        self.deliverer = deliverer
        self.cond = threading.Condition()
        self.lanes: list[Lane] = []
        self.tally: Counter[str] = Counter()
        self.before = Counter(deliverer.rounds)  # counted before the group started

    def submit(self, lane: Lane, request: Payload, sites: list[str]) -> dict[str, Payload]:
        """Queue ``lane``'s request; send the round when no lane is still working."""
        with self.cond:
            if lane.call.abandoned:
                raise Cancelled("abandoned: another fit of the study failed")
            lane.request, lane.targets, lane.state = request, list(sites), PENDING
            batch = self._take_round()
        if batch:
            self._send(batch)
        with self.cond:
            while lane.state != RUNNING:
                self.cond.wait()
            outcome, lane.outcome = lane.outcome, None
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def finish(self, lane: Lane) -> None:
        """``lane``'s fit returned (or raised): the others may go on without it."""
        with self.cond:
            lane.state = DONE
            call = lane.call
            if call.owner is not None and all(other.state == DONE for other in call.lanes):
                call.owner.state = RUNNING  # before any round: the owner asks next
            self.lanes = [other for other in self.lanes if other.state != DONE]
            batch = self._take_round()
            self.cond.notify_all()
        if batch:
            self._send(batch)

    def _take_round(self) -> list[Lane]:
        """The lanes whose requests go now (call with the lock held): all pending ones,
        once no lane is still working towards its next request."""
        if any(lane.state == RUNNING for lane in self.lanes):
            return []
        pending = sorted((lane for lane in self.lanes if lane.state == PENDING), key=_path)
        for lane in pending:
            lane.state = INFLIGHT
        if pending:
            self.tally[pending[0].tally or pending[0].step] += 1
        return pending

    def _send(self, lanes: list[Lane]) -> None:
        """One round: each site gets its lanes' requests (one alone, several batched)."""
        asked: dict[str, list[Lane]] = {}
        for lane in lanes:
            for site in lane.targets:
                asked.setdefault(site, []).append(lane)
        requests = {
            site: who[0].request if len(who) == 1 else pack([lane.request for lane in who])
            for site, who in asked.items()
        }
        outcomes: dict[int, Any] = {id(lane): {} for lane in lanes}
        try:
            self.deliverer.step = lanes[0].tally or lanes[0].step  # progress names the phase
            replies = self.deliverer._deliver_each(requests)
            for site, reply in replies.items():
                for lane, part in zip(asked[site], _split(reply, len(asked[site])), strict=True):
                    outcomes[id(lane)][site] = part
        except BaseException as exc:  # every lane of the round learns it
            outcomes = dict.fromkeys(outcomes, exc)
        with self.cond:
            for lane in lanes:
                lane.outcome, lane.state = outcomes[id(lane)], RUNNING
            self.cond.notify_all()


def _split(reply: Payload, n: int) -> list[Payload]:
    """A site's reply to ``n`` requests, one part per request.

    A reply that is not a batch of ``n`` (the site failed, or refused the message as a
    whole) is every request's reply.
    """
    if n == 1 or UNAVAILABLE in reply or "error" in reply:
        return [reply] * n
    try:
        parts = unpack(reply)
    except ValueError as exc:
        parts = [{"error": f"unreadable batch reply: {exc}"}]
    if len(parts) != n:
        return [{"error": f"a batch of {n} requests got {len(parts)} replies"}] * n
    return parts


def _path(lane: Lane) -> tuple[int, ...]:
    return lane.path


class Lane(Transport):
    """One fit of a group: a transport whose rounds are shared with the group's others.

    It starts with a copy of the state of the transport it was forked from (sites,
    context, phase, parameter budget), so the fit runs as it would alone.
    """

    def __init__(
        self,
        group: _Group,
        template: Transport,
        call: _Call,
        path: tuple[int, ...],
        tally: str | None,
    ) -> None:
        super().__init__()
        self.group, self.call, self.path, self.tally = group, call, path, tally
        self.name = template.name
        self.sites = list(template.sites)
        self.context = dict(template.context)
        self.step = template.step
        self.protocol = template.protocol
        self.param_budget = dict(template.param_budget)
        self.reply_wait = template.reply_wait
        self.failed = template.failed  # one run's failed sites, whichever fit noticed them
        self.scope = template.scope
        self._reachable = template.reachable
        self.state = RUNNING
        self.request: Payload = {}
        self.targets: list[str] = []
        self.outcome: Any = None

    @property
    def reachable(self) -> list[str]:
        return list(self._reachable)

    def _deliver_each(self, requests: dict[str, Payload]) -> dict[str, Payload]:
        # A lane sends one request to its sites per round (what Transport.ask does).
        request = next(iter(requests.values()))
        if any(r is not request for r in requests.values()):
            raise FederationError("a lane sends one request per round")
        return self.group.submit(self, request, list(requests))


def _lane_of(transport: Transport) -> Lane | None:
    """The lane ``transport`` sends through, if any (a lane, or some sites of one)."""
    while isinstance(transport, SiteSubset):
        transport = transport.parent
    return transport if isinstance(transport, Lane) else None


def _wait(thread: threading.Thread) -> None:
    while thread.is_alive():
        thread.join(0.5)  # wakes for Ctrl-C


def rounds_so_far(transport: Transport) -> dict[str, int]:
    """The rounds sent so far, by phase: the group's when ``transport`` is in a lane
    (with those its transport counted before), else the transport's own."""
    lane = _lane_of(transport)
    if lane is None:
        return dict(transport.rounds)
    with lane.group.cond:
        return dict(lane.group.before + lane.group.tally)


def together(
    transport: Transport,
    jobs: Sequence[Callable[[Transport], T]],
    tallies: Sequence[str | None] | None = None,
    cancel_on_error: bool = False,
) -> list[T]:
    """Run ``job(lane)`` for every job at once, their rounds shared.

    Each lane starts as a copy of ``transport``'s state; a job's changes to its lane
    (its context, phase) stay in that lane. Inside a lane, ``together`` forks it further
    (the lane waits for its forks and its own rounds resume after them).

    Parameters
    ----------
    transport : Transport
        Where the rounds go (or the lane they are forked from).
    jobs : sequence of callables
        Each takes its lane; their results come back in order.
    tallies : sequence of str or None, optional
        Per job, the phase its rounds are counted under when it leads a round (default:
        the lane's phase at the time).
    cancel_on_error : bool
        When a job raises, the others are abandoned at their next round (they raise
        :class:`Cancelled`) instead of finishing.

    Raises
    ------
    BaseException
        The first job's exception (in job order) that is not a :class:`Cancelled`.
    """
    owner = _lane_of(transport)
    group = owner.group if owner is not None else _Group(transport)
    call = _Call(owner)
    base = owner.path if owner is not None else ()
    inherited = owner.tally if owner is not None else None
    with group.cond:
        for i in range(len(jobs)):
            tally = (tallies[i] if tallies else None) or inherited
            call.lanes.append(Lane(group, transport, call, (*base, i), tally))
            call.lanes[-1].state = RUNNING if SHARE else QUEUED
        group.lanes.extend(call.lanes)
        if owner is not None:
            owner.state = WAITING
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException | None] = [None] * len(jobs)

    def work(i: int) -> None:
        try:
            results[i] = jobs[i](call.lanes[i])
        except BaseException as exc:
            errors[i] = exc
            if cancel_on_error:
                with group.cond:
                    call.cancelled = True
        finally:
            group.finish(call.lanes[i])

    threads = [
        threading.Thread(target=work, args=(i,), name=f"radfed-lane-{i}", daemon=True)
        for i in range(len(jobs))
    ]
    try:
        for lane, thread in zip(call.lanes, threads, strict=True):
            if not SHARE:  # one lane at a time: each alone in its rounds
                with group.cond:
                    lane.state = RUNNING
            thread.start()
            if not SHARE:
                _wait(thread)
        for thread in threads:
            _wait(thread)
    except BaseException:
        with group.cond:
            call.cancelled = True
        raise
    if owner is None:
        transport.rounds.update(group.tally)
    # A job's own failure before the Cancelled it caused in the others.
    for error in sorted(filter(None, errors), key=lambda e: isinstance(e, Cancelled)):
        raise error
    return results
