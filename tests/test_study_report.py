"""A radiomics study's own report, opened in a real headless browser: every section and
every kind of figure the statisticians asked for is there and renders."""

from __future__ import annotations

import dataclasses

from radfed.server.outputs.report import FIGURE_KINDS
from radfed.server.study.runner import run_study
from radfed.tests.test_report import SECTIONS, dump_dom


def test_synthetic_study_report_shows_every_item(synthetic_study, tmp_path):
    config = dataclasses.replace(synthetic_study, leave_one_site_out=True)
    result = run_study(config, out_dir=tmp_path / "out", track=False)
    assert result.details["external"]["status"] == "ran"
    page = tmp_path / "out" / "latest" / "report.html"
    dom = dump_dom(page, tmp_path / "chromium")
    headings = " | ".join(dom.headings["h2"])
    for section in SECTIONS:
        if section != "Federated versus pooled equivalence":  # only after --pooled
            assert section in headings, section
    h3 = " | ".join(dom.headings["h3"])
    for title in FIGURE_KINDS.values():
        assert title in h3, title
    assert dom.body.get("data-broken-images") == "0"
    # ROC, calibration and decision curves: 3 sites' test splits, pooled train and test,
    # 3 held-out sites; then LASSO CV, Radscore, forest plot and the nomogram.
    assert int(dom.body["data-images"]) == 3 * (3 + 2 + 3) + 4
    html = page.read_text()
    assert "Radscore = " in html and "random-effects" in html.lower()
