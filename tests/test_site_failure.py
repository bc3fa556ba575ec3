"""A hospital that stops answering mid-run: ``[federation] on_site_failure``.

"stop" ends the run with a message naming the site, the phase and the wait; "drop"
restarts the whole fit without the site (never mixing site sets) and gives what a study
of the remaining sites run from the start gives, recording the dropped site. In process
(fast): a transport whose one site stops replying from some round on. Over the
Deployment Engine (slow): a SuperNode killed mid-run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
import tomllib
from pathlib import Path

import pytest

from radfed.server.federation.inprocess import InProcessTransport
from radfed.server.federation.transport import UNAVAILABLE, SiteFailure
from radfed.server.outputs.report import render_report
from radfed.server.study.driver import FederatedStudy
from radfed.server.tracking.runs import tags_of
from radfed.shared.config import load_study, parse_study
from radfed.shared.errors import FederationError, StudyConfigError
from radfed.shared.messages import to_record
from radfed.tests.conftest import heart_study_text
from radfed.tests.reference import assert_same_results

SITES = ["cleveland", "hungarian", "va"]


class FailingTransport(InProcessTransport):
    """In process; ``failing`` stops answering from its ``from_round``-th round on (an
    int), or from the first round of a phase (its name: the round counts follow the
    sites' splits): its reply never comes (``how="silent"``), or the transport reports
    it unreachable (``"unavailable"``, as Flower does for a node without heartbeat)."""

    def __init__(self, workers, failing, from_round, how="silent", wait=30.0):
        super().__init__(workers)
        self.failing, self.from_round, self.how = failing, from_round, how
        self.reply_wait = wait  # as GridTransport's round_timeout: only for the messages
        self.seen = 0
        self.failed_at: int | None = None  # the failing site's round that went unanswered
        self.asked_after_failure = 0

    def _exchange(self, requests):
        if self.failing not in requests:
            return super()._exchange(requests)
        self.seen += 1
        if self.failed_at is None:
            phase = isinstance(self.from_round, str)
            if (self.step != self.from_round) if phase else (self.seen < self.from_round):
                return super()._exchange(requests)
            self.failed_at = self.seen
        self.asked_after_failure += 1
        replies = super()._exchange({s: r for s, r in requests.items() if s != self.failing})
        if self.how == "unavailable":
            error = "Flower error 5: Error: Node Unavailable"
            replies[self.failing] = to_record({"error": error, UNAVAILABLE: error})
        return replies


def write_study(heart_dir: Path, sites, policy=None, name="study.toml", **kwargs):
    text = heart_study_text(list(sites), **kwargs)
    if policy is not None:
        text += f'\n[federation]\non_site_failure = "{policy}"\n'
    path = heart_dir / name
    path.write_text(text)
    return load_study(path)


def failing_run(config, failing, from_round, **kwargs):
    transport = FailingTransport(
        InProcessTransport.from_study(config).workers, failing, from_round, **kwargs
    )
    return FederatedStudy(config, transport).run(), transport


def as_json(result) -> dict:
    return json.loads(json.dumps(result.to_dict()))


def without(config, site):
    """The study of the other sites, run from the start (the same data folders, so the
    same site secrets, splits and folds)."""
    return dataclasses.replace(config, sites=tuple(s for s in config.sites if s.name != site))


def run_of(config) -> dict:
    return as_json(FederatedStudy(config, InProcessTransport.from_study(config)).run())


def without_abandoned(results: dict) -> dict:
    rounds = dict(results["rounds"])
    rounds.pop("abandoned", None)
    return {**results, "rounds": rounds}


# ----------------------------------------------------------------- the study file


def test_policy_is_read_and_checked(tmp_path):
    base = heart_study_text(SITES)
    study = parse_study(tomllib.loads(base), tmp_path)
    assert study.on_site_failure == "stop"  # the default
    for policy in ("stop", "drop"):
        text = base + f'\n[federation]\non_site_failure = "{policy}"\nround_timeout = 45\n'
        study = parse_study(tomllib.loads(text), tmp_path)
        assert (study.on_site_failure, study.round_timeout) == (policy, 45.0)
    for bad, shown in (('"skip"', "'skip'"), ("true", "True"), ('"Drop"', "'Drop'")):
        text = base + f"\n[federation]\non_site_failure = {bad}\n"
        with pytest.raises(StudyConfigError) as caught:
            parse_study(tomllib.loads(text), tmp_path)
        assert str(caught.value) == (
            f'[federation]: on_site_failure must be "stop" or "drop", got {shown}'
        )
    # The policy is the coordinator's: it does not change the protocol the sites pin.
    text = base + '\n[federation]\non_site_failure = "drop"\n'
    dropping = parse_study(tomllib.loads(text), tmp_path)
    assert dropping.protocol_hash() == parse_study(tomllib.loads(base), tmp_path).protocol_hash()


# ----------------------------------------------------------------- over a Flower Grid


class FakeGrid:
    """Site a is node 1; site b (node 2) is gone after the first round: the SuperLink
    answers for it with Flower error ``code`` (from node 0), or (``code=None``) no
    reply ever comes."""

    def __init__(self, code: int | None) -> None:
        self.names, self.code, self.out = {1: "a", 2: "b"}, code, {}

    def get_node_ids(self):
        return [1, 2]

    def push_messages(self, messages):
        from uuid import uuid4

        from flwr.app import Error, Message

        from radfed.shared.messages import from_record

        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = str(uuid4())
            ids.append(m.metadata.message_id)
            task, node = from_record(m.content)["task"], m.metadata.dst_node_id
            if task == "hello":
                reply = Message(to_record({"site": self.names[node]}), reply_to=m)
            elif node == 2 and task != "describe":
                if self.code is None:
                    continue
                reply = Message(Error(code=self.code, reason="Error: Node Unavailable"), reply_to=m)
                reply.metadata.__dict__["_src_node_id"] = 0  # the SuperLink's own reply
            else:
                reply = Message(to_record({"ok": 1}), reply_to=m)
            self.out[m.metadata.message_id] = reply
        return ids

    def pull_messages(self, ids):
        return [self.out.pop(i) for i in list(ids) if i in self.out]


@pytest.mark.parametrize("code", [None, 5, 2])
def test_grid_transport_tells_a_gone_site_from_a_refusal(code, monkeypatch):
    """No reply within round_timeout, or Flower's "node unavailable" (sent by the
    SuperLink, not by the node), is a SiteFailure; a ClientApp exception (code 2) is
    an error that stops the run."""
    from flwr.supercore.task_identity import TaskIdentity

    from radfed.server.federation.flower import GridTransport

    for key, value in {"_run_id": 1, "_task_id": 1, "_node_id": 0}.items():
        monkeypatch.setattr(TaskIdentity, key, value)
    transport = GridTransport(FakeGrid(code), ["a", "b"], reply_timeout=0.3)
    transport.step = "split"
    assert transport.ask("describe") == {"a": {"ok": 1}, "b": {"ok": 1}}
    with pytest.raises(FederationError) as caught:
        transport.ask("split")
    if code == 2:
        assert not isinstance(caught.value, SiteFailure)
        assert "b: Flower error 2: Error: Node Unavailable" in str(caught.value)
        return
    assert isinstance(caught.value, SiteFailure)
    why = "no reply within 0.3 s" if code is None else "Flower error 5: Error: Node Unavailable"
    assert caught.value.failures == {
        "b": why if code else f"{why}, the study's [federation] round_timeout"
    }
    assert caught.value.phase == "split"
    # b is not asked again: the next round with it fails at once.
    transport.grid.code = 2
    with pytest.raises(SiteFailure, match="it stopped answering earlier, in phase 'split'"):
        transport.ask("logistic")
    assert transport.rounds["split"] == 2  # describe and split; nothing sent after


# ----------------------------------------------------------------- stop


@pytest.mark.parametrize("how", ["silent", "unavailable"])
def test_stop_names_the_site_the_phase_the_wait_and_what_to_do(heart_dir, how):
    config = write_study(heart_dir, SITES)  # the default policy: stop
    with pytest.raises(SiteFailure) as caught:
        failing_run(config, "va", from_round=4, how=how, wait=30)
    message = str(caught.value)
    assert "site 'va' stopped answering" in message
    assert "in phase 'screening'" in message  # rounds 1-2: consistency, split
    assert "round 2 of the phase" in message
    if how == "silent":
        assert "no reply within 30 s, the study's [federation] round_timeout" in message
    else:
        assert "Node Unavailable" in message
    assert "restart the site's SuperNode" in message
    assert 'set on_site_failure = "drop"' in message
    assert "\n" not in message


def test_a_refusal_is_not_a_site_failure(heart_dir):
    """A site that answers with an error refuses: the run stops whatever the policy."""

    class Refusing(InProcessTransport):
        def _exchange(self, requests):
            replies = super()._exchange(requests)
            if self.step == "screening":
                replies["va"] = to_record({"error": "refused by a rule"})
            return replies

    config = write_study(heart_dir, SITES, policy="drop")
    with pytest.raises(FederationError) as caught:
        FederatedStudy(config, Refusing(InProcessTransport.from_study(config).workers)).run()
    assert not isinstance(caught.value, SiteFailure)
    assert "va: refused by a rule" in str(caught.value)


# ----------------------------------------------------------------- drop


@pytest.mark.parametrize("phase", ["mrmr", "evaluate"])
def test_drop_equals_a_study_of_the_remaining_sites_from_the_start(heart_dir, phase):
    """The whole pipeline (ComBat, mRMR, LASSO CV, screening, nomogram): va stops
    answering in mRMR, or in the evaluation (its calibration rounds included); the fit
    restarts from consistency on cleveland and hungarian and equals their study."""
    config = write_study(heart_dir, SITES, policy="drop", pipeline=True)
    result, transport = failing_run(config, "va", from_round=phase, wait=30)
    results = as_json(result)

    assert results["federation"]["sites"] == ["cleveland", "hungarian"]
    assert list(results["sites"]) == ["cleveland", "hungarian"]
    assert transport.asked_after_failure == 1  # one wait: never asked again
    (dropped,) = results["federation"]["dropped_sites"]
    assert dropped["site"] == "va"
    assert dropped["phase"] == phase
    assert "no reply within 30 s" in dropped["reason"]
    assert dropped["round"] >= 1 and dropped["time"]
    assert dropped["action"].startswith("the fit restarted from the first phase on")
    assert results["rounds"]["abandoned"] == transport.failed_at > 6
    # The study settings stay those of the study file.
    assert json.loads(results["settings"]["sites"]) == SITES

    expected = run_of(without(config, "va"))
    assert "dropped_sites" not in expected["federation"]
    assert_same_results(without_abandoned(results), expected, tol=1e-9)
    assert results["performance"].keys() == expected["performance"].keys()
    for model, per_site in expected["performance"].items():
        assert results["performance"][model].keys() == per_site.keys()

    # The report warns, naming the site and the phase; MLflow gets a tag.
    html = render_report(results)
    box = html[html.index('<div class="warnbox"') :]
    box = box[: box.index("</div>")]
    assert "<strong>va</strong> stopped answering in phase" in box
    assert f"<strong>{phase}</strong>" in box
    assert "restarted from its first phase" in box
    assert tags_of(result)["radfed.dropped_sites"].startswith(f"va ({phase}, round ")


def test_drop_with_an_unreachable_site_excludes_it_from_leave_one_site_out(heart_dir):
    """Clinical study, leave-one-site-out on: va is unreachable from its 10th round (the
    screening); the refits hold out cleveland and hungarian only, as in their study."""
    config = write_study(heart_dir, SITES, policy="drop", loso=True)
    result, transport = failing_run(config, "va", from_round=10, how="unavailable")
    results = as_json(result)
    assert transport.asked_after_failure == 1
    (dropped,) = results["federation"]["dropped_sites"]
    assert (dropped["site"], dropped["phase"]) == ("va", "models")
    assert "Node Unavailable" in dropped["reason"]
    assert set(results["external"]["held_out"]) == {"cleveland", "hungarian"}

    expected = run_of(without(config, "va"))
    assert_same_results(without_abandoned(results), expected, tol=1e-9)
    for site, entry in expected["external"]["held_out"].items():
        mine = results["external"]["held_out"][site]
        assert mine["status"] == entry["status"]
        assert (
            mine["training_sites"]
            == entry["training_sites"]
            == [s for s in ("cleveland", "hungarian") if s != site]
        )


def test_drop_stops_when_too_few_training_sites_remain(heart_dir):
    config = write_study(heart_dir, ["cleveland", "hungarian"], policy="drop")
    with pytest.raises(FederationError) as caught:
        failing_run(config, "hungarian", from_round=3, wait=20)
    message = str(caught.value)
    assert message.startswith("site 'hungarian' stopped answering (no reply within 20 s")
    assert "in phase 'screening'" in message
    assert (
        'on_site_failure = "drop" would leave 1 training site(s) (cleveland), fewer than '
        "the 2 a federated fit needs: restart the site's SuperNode and run the study again"
    ) in message


def test_a_validation_site_failing_fails_its_entry_only(heart_dir):
    """Switzerland (validation-only) never answers: its external entry is marked failed
    with the reason and recorded; the fit on the training sites is untouched."""
    config = write_study(heart_dir, SITES, validation=("switzerland",))
    result, _ = failing_run(config, "switzerland", from_round=1, wait=25)
    results = as_json(result)
    entry = results["external"]["validation"]["switzerland"]
    assert entry["status"] == "failed"
    assert entry["reason"].startswith("site 'switzerland' stopped answering (no reply within 25 s")
    assert "SuperNode" not in entry["reason"]  # no advice to restart the fit
    (dropped,) = results["federation"]["dropped_sites"]
    assert (dropped["site"], dropped["phase"]) == ("switzerland", "validation")
    assert dropped["action"] == "its external validation is marked failed"
    assert "abandoned" not in results["rounds"]
    assert results["federation"]["sites"] == SITES

    plain = run_of(config)
    assert plain["external"]["validation"]["switzerland"]["status"] == "ok"
    assert_same_results(results, plain | {"rounds": results["rounds"]}, tol=1e-9)
    html = render_report(results)
    assert "Only external validation lost these sites" in html


# ----------------------------------------------------------------- Deployment Engine


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_a_killed_supernode_is_dropped_and_the_run_completes(heart_dir, tmp_path):
    """Three SuperNodes; va's is killed (SIGKILL) once the screening has begun. With
    on_site_failure = "drop" the ServerApp waits round_timeout, restarts the fit on
    cleveland and hungarian, and the run completes with the in-process numbers of
    those two sites."""
    from radfed.deploy.local_federation import (
        LOG_DIR,
        SERVERAPP_LOG,
        LocalFederation,
        alive_pids,
        run_config_for,
        site_nodes,
        submit_run,
    )

    wait = 60  # the wait for the dead site; a loaded machine's rounds take 16-26 s
    text = (
        heart_study_text(SITES)
        + f'\n[federation]\non_site_failure = "drop"\nround_timeout = {wait}\n'
    )
    (heart_dir / "study.toml").write_text(text)
    config = load_study(heart_dir / "study.toml")
    out, work = tmp_path / "out", tmp_path / "flwr"
    log_dir = out / LOG_DIR
    log_dir.mkdir(parents=True)
    serverapp_log = log_dir / SERVERAPP_LOG
    killed: dict[str, float] = {}

    with LocalFederation(site_nodes(config), work, log_dir=log_dir) as federation:
        victim = federation.supernodes["va"]

        def kill_when_screening_starts() -> None:
            while "phase: screening" not in (
                serverapp_log.read_text() if serverapp_log.exists() else ""
            ):
                if not federation.superlink or not federation.superlink.running():
                    return
                time.sleep(0.5)
            victim.remember_descendants()  # its SuperExec and ClientApps go too
            victim.signal_group(signal.SIGKILL)
            for pid in alive_pids(victim.descendants):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            killed["at"] = time.monotonic()
            # When the ServerApp noticed (its warning) and restarted (consistency again).
            while federation.superlink and federation.superlink.running():
                text = serverapp_log.read_text()
                if "noticed" not in killed and "stopped answering" in text:
                    killed["noticed"] = time.monotonic()
                if text.count("phase: consistency") >= 2:
                    killed["restarted"] = time.monotonic()
                    return
                time.sleep(0.5)

        def superlink_alive() -> None:
            # Not LocalFederation.check_alive: a dead SuperNode is what is tested.
            if not federation.superlink.running():
                raise FederationError("the SuperLink exited")

        killer = threading.Thread(target=kill_when_screening_starts, daemon=True)
        killer.start()
        started = time.monotonic()
        submit_run(
            federation.connection,
            run_config_for(config, out, track=False),
            log_path=serverapp_log,
            timeout=3000,
            check_alive=superlink_alive,
            diagnostics=federation.log_tails,
        )
        finished = time.monotonic()
        killer.join(timeout=5)
    assert "at" in killed, "the SuperNode was not killed"

    results = json.loads((out / "results.json").read_text())
    assert results["transport"] == "deployment"
    assert results["federation"]["sites"] == ["cleveland", "hungarian"]
    (dropped,) = results["federation"]["dropped_sites"]
    assert dropped["site"] == "va"
    assert dropped["phase"] in ("screening", "models")
    assert f"no reply within {wait} s" in dropped["reason"] or "Unavailable" in dropped["reason"]
    assert results["rounds"]["abandoned"] >= 3

    expected = run_of(without(config, "va"))
    assert_same_results(without_abandoned(results), expected, tol=1e-9)
    html = (out / "report.html").read_text()
    assert '<div class="warnbox"' in html and "<strong>va</strong>" in html

    assert killed["at"] < killed["noticed"] < killed["restarted"]
    print(
        f"\nva killed {killed['at'] - started:.0f} s into the run; noticed "
        f"{killed['noticed'] - killed['at']:.0f} s and restarted "
        f"{killed['restarted'] - killed['at']:.0f} s after the kill (round_timeout {wait} s); "
        f"the run took {finished - started:.0f} s"
    )
