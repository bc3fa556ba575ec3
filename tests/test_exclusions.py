"""Which patients a site kept out, and why: published as counts that respect min_cell.

A site sends, with its description, its excluded patients per kind of reason (no ids,
no values). Small counts are merged into "other reasons", and so are the smallest
others until that total passes too: otherwise the withheld count would be known as a
difference from the published total.
"""

from __future__ import annotations

import json

import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from radfed.client.site import SiteSettings, SiteWorker
from radfed.server.outputs.report import render_report
from radfed.server.results import StudyResult
from radfed.shared.config import load_study
from radfed.shared.messages import roundtrip
from radfed.shared.privacy import PrivacyPolicy
from radfed.tests.conftest import heart_study_text


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    st.dictionaries(st.sampled_from("abcdefgh"), st.integers(0, 40), max_size=8),
    st.integers(2, 12),
)
def test_published_reason_counts_hide_every_small_count(counts, min_cell):
    policy = PrivacyPolicy(min_cell=min_cell)
    shown = policy.suppress(counts)
    assert all(v == -1 or v >= min_cell for v in shown.values())
    # Nothing is lost: the published counts and the withheld "other" add up.
    known = sum(v for v in shown.values() if v > 0)
    total = sum(counts.values())
    if -1 not in shown.values():
        assert known == total
    else:
        # The withheld remainder is below min_cell; nothing else is hidden with it.
        assert 0 < total - known < min_cell and list(shown).count("other reasons") == 1
    # With one reason per patient the total is published too: the difference of the
    # total and the shown counts is the "other" count, never a small one.
    other = total - sum(v for k, v in shown.items() if k != "other reasons" and v > 0)
    assert other == 0 or other >= min_cell or shown.get("other reasons") == -1


def test_a_site_publishes_its_exclusions_per_reason(heart_dir, tmp_path):
    (heart_dir / "study.toml").write_text(heart_study_text(["cleveland", "hungarian", "va"]))
    config = load_study(heart_dir / "study.toml")
    protocol = config.protocol()
    rows = pd.read_csv(heart_dir / "sites" / "va" / "features.csv")
    incomplete = rows[[config.outcome, *config.clinical]].isna().any(axis=1)
    worker = SiteWorker(
        SiteSettings("va", heart_dir / "sites" / "va", PrivacyPolicy(min_cell=5), tmp_path / "s")
    )
    reply = worker.handle(roundtrip({"task": "describe", "protocol": protocol}))
    reasons = reply["exclusions"]
    assert reply["n_excluded"] == incomplete.sum() > 5  # VA's patients with a missing value
    assert all(v >= 5 or v == -1 for v in reasons.values())
    # Every patient counted (under each of its reasons); at most 4 withheld as "other".
    assert sum(v for v in reasons.values() if v > 0) >= incomplete.sum() - 4
    assert any("trestbps" in r for r in reasons)  # VA's most often missing variable
    assert not any("line" in r or "patient" in r for r in reasons)  # no rows, no ids
    text = json.dumps(reasons)
    assert "/" not in text  # no paths


def test_run_summary_and_report_show_the_exclusions():
    sites = {
        "va": {
            "n": 97,
            "events": 70,
            "n_excluded": 103,
            "exclusions": {"'chol' is missing": 61, "other reasons": 42},
        },
        "small": {"n": 50, "events": 20, "n_excluded": None, "exclusions": {"other reasons": -1}},
    }
    result = StudyResult("s", "y", "inprocess", sites, {}, {}, {}, {})
    text = result.exclusion_table()
    assert "va: 103 excluded" in text and "61  'chol' is missing" in text
    assert "small: fewer than the site's minimum cell" in text and "<min_cell" in text
    assert text.index("'chol'") < text.index("other reasons")
    page = render_report(json.loads(json.dumps(result.to_dict())))
    assert "Patients kept out, per site and kind of reason" in page
    assert '<td class="l">&#x27;chol&#x27; is missing</td><td>61</td>' in page
