"""Privacy is enforced at the site: aggregate-only shapes, minimum cells, parameter limit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from radfed.client.site import SiteSettings, SiteWorker
from radfed.server.federation.inprocess import InProcessTransport
from radfed.server.study.driver import FederatedStudy
from radfed.shared.config import load_study
from radfed.shared.errors import FederationError, PrivacyRefusal
from radfed.shared.evaluation_stats import BIN_EDGES, THRESHOLDS
from radfed.shared.messages import roundtrip, shape_signature
from radfed.shared.privacy import PrivacyPolicy
from radfed.tests.conftest import heart_study_text


class RecordingTransport(InProcessTransport):
    """In-process transport that keeps every encoded reply, to inspect what leaves a site."""

    def __init__(self, workers):
        super().__init__(workers)
        self.seen: list[tuple[str, str, dict]] = []

    def _exchange(self, requests):
        from radfed.client.site import request_sizes
        from radfed.shared.messages import from_record

        replies = super()._exchange(requests)
        for site, rec in replies.items():
            fixed = frozenset(request_sizes(from_record(requests[site])))
            self.seen.append((self.step, site, (fixed, shape_signature(from_record(rec)))))
        return replies


def _subsample(heart_dir, site: str, fraction: float, seed: int) -> None:
    path = heart_dir / "sites" / site / "features.csv"
    table = pd.read_csv(path)
    table.sample(frac=fraction, random_state=seed).to_csv(path, index=False)


def test_reply_shapes_do_not_depend_on_the_number_of_patients(heart_pipeline_study, heart_dir):
    """The whole pipeline on sites of very different sizes sends replies of identical
    shapes, and no reply array has a dimension equal to a site's number of patients."""
    signatures, counts = [], []
    for fraction in (1.0, 0.6):
        if fraction < 1:
            _subsample(heart_dir, "cleveland", fraction, 0)
            _subsample(heart_dir, "hungarian", fraction, 1)
        config = load_study(heart_dir / "study.toml")
        transport = RecordingTransport(InProcessTransport.from_study(config).workers)
        result = FederatedStudy(config, transport).run()
        # Rounds repeat (Newton, IRLS, mRMR); compare the set of shapes each phase sent.
        seen: dict[tuple[str, str], set] = {}
        for step, site, (fixed, sig) in transport.seen:
            seen.setdefault((step, site), set()).add((fixed, tuple(sorted(sig.items()))))
        signatures.append(seen)
        counts.append(
            {
                n
                for info in result.sites.values()
                for n in (info["train"]["n"], info["test"]["n"], info["n"])
            }
        )
    full, small = signatures
    assert full.keys() == small.keys()
    assert full == small
    # A dimension may equal a site's number of patients by chance only where the request
    # (or the site's own grids: 99 thresholds, 10 risk bins) fixed that size.
    grids = {len(THRESHOLDS), len(BIN_EDGES) - 1}
    for seen, sizes in zip(signatures, counts, strict=True):
        for sigs in seen.values():
            for fixed, sig in sigs:
                for key, shape in sig:
                    if isinstance(shape, tuple):
                        assert not set(shape) & (sizes - grids - fixed), (key, shape, sizes)


def test_small_cell_is_refused_with_the_site_and_reason(heart_dir):
    """Switzerland has 8 healthy patients: its 30% test split holds 2 (< min_cell 3)."""
    (heart_dir / "study.toml").write_text(heart_study_text(["cleveland", "switzerland"]))
    config = load_study(heart_dir / "study.toml")
    with pytest.raises(
        FederationError, match=r"switzerland: test split: refused by the min-cell rule"
    ):
        FederatedStudy(config, InProcessTransport.from_study(config)).run()


def test_refusal_is_a_reply_not_a_crash(heart_dir):
    settings = SiteSettings(
        "switzerland", heart_dir / "sites" / "switzerland", PrivacyPolicy(min_cell=3)
    )
    config = load_study(_write(heart_dir, ["switzerland"]))
    reply = SiteWorker(settings).handle(roundtrip({"task": "split", "protocol": config.protocol()}))
    assert reply["error_kind"] == "privacy" and "min-cell" in reply["error"]


def test_too_many_parameters_are_refused():
    policy = PrivacyPolicy(min_cell=3, max_param_fraction=1 / 3)
    policy.check_parameters(10, 30, "ok")
    with pytest.raises(PrivacyRefusal, match="11 parameters exceed the site's limit"):
        policy.check_parameters(11, 30, "logistic")


def test_row_level_array_is_refused():
    with pytest.raises(PrivacyRefusal, match="not an aggregate"):
        PrivacyPolicy.check_shapes({"eta": np.zeros(57)}, {7, 8}, "evaluate")
    PrivacyPolicy.check_shapes({"h": np.zeros((8, 8)), "g": np.zeros(8)}, {7, 8}, "logistic")


def test_site_limit_is_the_sites_own(heart_dir):
    """A site configured with min_cell 50 refuses even if the study asks for 3."""
    config = load_study(_write(heart_dir, ["va"]))
    strict = SiteWorker(SiteSettings("va", heart_dir / "sites" / "va", PrivacyPolicy(min_cell=50)))
    reply = strict.handle(roundtrip({"task": "split", "protocol": config.protocol()}))
    assert "minimum cell size 50" in reply["error"]


def _write(heart_dir, sites):
    path = heart_dir / "study.toml"
    path.write_text(heart_study_text(sites))
    return path


@pytest.mark.parametrize("bad", [None, "3", 2.5, True, 0, [3]])
def test_a_policy_refuses_a_min_cell_that_is_not_a_whole_number(bad):
    from radfed.shared.privacy import PrivacyPolicy

    with pytest.raises(ValueError, match="min_cell must be"):
        PrivacyPolicy(min_cell=bad)
