"""Fits that share rounds: lockstep lanes, batches a site answers item by item, and a
whole study whose results do not change when its fits share rounds (issue 11)."""

from __future__ import annotations

import numpy as np
import pytest

from radfed.client.site import SiteSettings, SiteWorker
from radfed.client.site_state import read_audit
from radfed.server.federation import shared_rounds
from radfed.server.federation.inprocess import InProcessTransport
from radfed.server.federation.shared_rounds import Cancelled, together
from radfed.server.federation.transport import Transport
from radfed.server.study.driver import FederatedStudy
from radfed.shared.config import load_study
from radfed.shared.errors import FederationError
from radfed.shared.messages import MAX_BATCH, pack, roundtrip, unpack
from radfed.tests.conftest import heart_study_text
from radfed.tests.reference import assert_same_results


class Doubling(Transport):
    """Sites that double ``x``; records what each round sent to each site."""

    name = "doubling"

    def __init__(self) -> None:
        super().__init__()
        self.sites = ["a", "b", "c"]
        self.sent: list[dict[str, list[int]]] = []

    def _deliver_each(self, requests):
        self.sent.append({})
        replies = {}
        for site, request in requests.items():
            items = unpack(request) if request["task"] == "batch" else [request]
            self.sent[-1][site] = [item["x"] for item in items]
            answers = [{"y": 2 * item["x"]} for item in items]
            replies[site] = pack(answers) if request["task"] == "batch" else answers[0]
        return replies


def asks(values: list[int], sites: list[str] | None = None, step: str = "p"):
    def job(lane: Transport) -> list[int]:
        lane.step = step
        return [lane.ask("t", {"x": v}, sites=sites)[(sites or lane.sites)[0]]["y"] for v in values]

    return job


def test_lanes_move_in_lockstep_and_each_gets_its_own_replies():
    t = Doubling()
    out = together(t, [asks([1, 2, 3], step="main"), asks([10, 20], ["b"]), asks([100], ["c"])])
    assert out == [[2, 4, 6], [20, 40], [200]]
    assert len(t.sent) == 3  # the longest lane's rounds, not the sum (6)
    assert t.sent[0] == {"a": [1], "b": [1, 10], "c": [1, 100]}
    assert t.sent[1] == {"a": [2], "b": [2, 20], "c": [2]}
    assert t.sent[2] == {"a": [3], "b": [3], "c": [3]}
    assert t.rounds == {"main": 3}  # counted once each, under the first lane's phase


def test_forks_share_rounds_with_their_siblings_and_the_owner_resumes_after_them():
    def owner(lane: Transport) -> list:
        first = lane.ask("t", {"x": 1})["a"]["y"]
        forked = together(lane, [asks([2, 3], ["a"]), asks([4], ["b"])])
        last = lane.ask("t", {"x": 5})["a"]["y"]
        return [first, forked, last]

    logs = []
    for _ in range(3):  # the composition of rounds is fixed by the jobs alone
        t = Doubling()
        out = together(t, [owner, asks([7, 8, 9, 11], ["c"])], tallies=[None, "other"])
        assert out == [[2, [[4, 6], [8]], 10], [14, 16, 18, 22]]
        logs.append(t.sent)
    assert logs[0] == logs[1] == logs[2]
    assert logs[0] == [
        {"a": [1], "b": [1], "c": [1, 7]},
        {"a": [2], "b": [4], "c": [8]},
        {"a": [3], "c": [9]},
        {"a": [5], "b": [5], "c": [5, 11]},
    ]


def test_a_failing_lane_abandons_the_others_when_asked():
    def failing(lane: Transport) -> None:
        lane.ask("t", {"x": 1})
        raise FederationError("the main fit failed")

    seen: list[BaseException] = []

    def patient(lane: Transport) -> None:
        try:
            for v in range(10):
                lane.ask("t", {"x": v})
        except Cancelled as exc:
            seen.append(exc)
            raise

    t = Doubling()
    with pytest.raises(FederationError, match="the main fit failed"):
        together(t, [failing, patient], cancel_on_error=True)
    assert len(seen) == 1 and len(t.sent) == 2  # one shared round, then one more at most


def test_taking_turns_sends_the_same_requests_in_more_rounds(monkeypatch):
    jobs = [asks([1, 2, 3]), asks([10, 20], ["b"])]
    shared = Doubling()
    together(shared, jobs)
    monkeypatch.setattr(shared_rounds, "SHARE", False)
    turns = Doubling()
    assert together(turns, jobs) == [[2, 4, 6], [20, 40]]
    assert len(turns.sent) == 5 and len(shared.sent) == 3


# --------------------------------------------------------------- the site's side


@pytest.fixture
def worker(heart_study):
    site = heart_study.sites[0]
    return SiteWorker(SiteSettings(site.name, site.path, heart_study.privacy)), heart_study


def test_a_site_answers_each_item_of_a_batch_as_if_it_came_alone(worker, heart_study):
    w, study = worker
    protocol = study.protocol()
    requests = [
        {"task": "describe", "protocol": protocol},
        {"task": "split", "protocol": protocol},
    ]
    alone = [w.handle(roundtrip(r)) for r in requests]
    before = len(read_audit(w.state.folder))
    batched = unpack(roundtrip(w.handle(roundtrip(pack(requests)))))
    assert len(batched) == 2
    for mine, theirs in zip(batched, alone, strict=True):
        assert mine.keys() == theirs.keys()
        for key in mine:
            np.testing.assert_equal(mine[key], theirs[key])
    entries = read_audit(w.state.folder)[before:]
    assert [e["task"] for e in entries] == ["describe", "split"]  # each item audited


def test_a_refused_item_fails_only_itself(worker):
    w, study = worker
    requests = [
        {"task": "describe", "protocol": study.protocol()},
        {"task": "moments", "protocol": {**study.protocol(), "seed": 999}},  # a moved seed
    ]
    good, refused = unpack(w.handle(roundtrip(pack(requests))))
    assert "error" not in good and good["site"] == study.sites[0].name
    assert refused["error_kind"] in {"privacy", "data"}


@pytest.mark.parametrize(
    "batch",
    [
        {"task": "batch", "batch_size": 0},
        {"task": "batch", "batch_size": MAX_BATCH + 1},
        {"task": "batch", "batch_size": "2"},
        {"task": "batch", "batch_size": True},
        {"task": "batch", "batch_size": 1, "0|task": "describe", "x": 1},
        {"task": "batch", "batch_size": 1, "1|task": "describe"},
        {"task": "batch", "batch_size": 1, "0|task": "batch", "0|batch_size": 1},
    ],
    ids=["empty", "too-large", "size-text", "size-bool", "stray-key", "index-out", "nested"],
)
def test_hostile_batches_are_refused_in_one_line(worker, batch):
    w, _ = worker
    reply = w.handle(batch)
    assert reply["error_kind"] == "data" and "\n" not in reply["error"]
    assert not any("|" in key for key in reply)  # nothing was answered


# --------------------------------------------------------------- a whole study


def test_a_study_shares_its_rounds_and_its_results_do_not_change(heart_dir, monkeypatch):
    path = heart_dir / "study.toml"
    text = heart_study_text(["cleveland", "hungarian", "va"], pipeline=True, loso=True)
    path.write_text(text)
    config = load_study(path)
    shared = FederatedStudy(config, InProcessTransport.from_study(config)).run().to_dict()
    monkeypatch.setattr(shared_rounds, "SHARE", False)
    turns = FederatedStudy(config, InProcessTransport.from_study(config)).run().to_dict()
    # The main fit and three leave-one-site-out refits: sharing rounds sends about a
    # quarter of them, and every number is the same.
    assert sum(shared["rounds"].values()) <= 50
    assert sum(turns["rounds"].values()) > 3 * sum(shared["rounds"].values())
    assert_same_results(shared, turns | {"rounds": shared["rounds"]}, tol=1e-12)
    for key in ("external", "evaluation", "harmonization", "clinical_screening"):
        assert_close(shared[key], turns[key], key)


def assert_close(mine, theirs, where: str) -> None:
    """Every number and name of two results.json parts agree (numbers to 1e-12)."""
    if isinstance(mine, dict):
        assert mine.keys() == theirs.keys(), where
        for key in mine:
            assert_close(mine[key], theirs[key], f"{where}.{key}")
    elif isinstance(mine, list):
        assert len(mine) == len(theirs), where
        for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            assert_close(a, b, f"{where}[{i}]")
    elif isinstance(mine, float):
        assert mine == pytest.approx(theirs, abs=1e-12, nan_ok=True), where
    else:
        assert mine == theirs, where
