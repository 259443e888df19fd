"""`xedge sweep`: every mode converted, validated and benched, on the trained tiny digits model.

One real CLI run (subprocess, real local bench) on a small eval sample; the
HTML is rendered in headless Chromium as in tests/validation/test_validate.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.core.artifacts import manifest_path_for
from pipeline.validation.sweep import DEFAULT_MODES as SWEEP_MODES
from pipeline.validation.sweep import run_sweep
from tests.browser import chromium as _chromium
from tests.conftest import run_cli

EVAL_LIMIT = 40


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory, trained_run, digits):
    out = tmp_path_factory.mktemp("sweep")
    proc = run_cli("xedge", "sweep", trained_run.model_path, "--calib", digits["samples"], "--calib-size", 32,
                   "--eval", digits["val"], "--eval-limit", EVAL_LIMIT, "--out", out, "--max-drop", 2.5)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_sweep_writes_one_row_per_mode(sweep_run):
    out, proc = sweep_run
    record = json.loads((out / "sweep.json").read_text())
    rows = {r["mode"]: r for r in record["rows"]}
    assert list(rows) == list(SWEEP_MODES)
    for name, row in rows.items():
        assert Path(row["path"]).is_file() and row["bytes"] == Path(row["path"]).stat().st_size, name
        assert row["p50_ms"] > 0 and row["p90_ms"] >= row["p50_ms"], name
        assert 0 <= row["top1"] <= 1 and row["top1_float"] == rows["float"]["top1_float"], name
        assert (out / row["report"]).is_file(), name
    assert rows["float"]["top1_drop_pp"] == 0 and rows["float"]["agreement"] == 1.0
    assert rows["int8"]["bytes"] < rows["fp16"]["bytes"] < rows["float"]["bytes"]
    fallback = rows["int8-fallback"]
    if "not reached" in fallback["note"]:  # judged on 10 held-out images (one per class), one image is 10 pp
        kept = json.loads(manifest_path_for(fallback["path"]).read_text())
        assert kept["float_fallback"]["gate"]["top1_drop_pp"] > 2.5
    else:  # within budget on the 30 search and the 10 held-out images, so on all 40 validate measures
        assert fallback["top1_drop_pp"] <= 2.5 and "on 10 held-out images" in fallback["note"]
    if not fallback["float_layers"]:
        assert "no fallback" in fallback["note"]
    assert record["eval"]["images"] == EVAL_LIMIT
    md = (out / "sweep.md").read_text()
    assert all(f"| {name} |" in md for name in SWEEP_MODES)
    assert "int8-per-tensor" in proc.stdout and "sweep.html" in proc.stdout


IMG_CHECK = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 100).length;
  const rows = document.querySelectorAll("table tr").length;
  const marker = document.createElement("div");
  marker.id = "img-check";
  marker.textContent = `images-decoded ${ok}/${imgs.length} rows ${rows}`;
  document.body.appendChild(marker);
});
</script>"""


def test_sweep_html_renders_in_headless_chromium(chromium_bin, sweep_run, tmp_path):
    out, _ = sweep_run
    text = (out / "sweep.html").read_text()
    assert "http://" not in text and "https://" not in text  # self-contained
    checked = out / "checked.html"  # beside sweep.html, so the relative report links resolve
    checked.write_text(text.replace("</body>", IMG_CHECK + "</body>"))
    dom = _chromium(chromium_bin, "--virtual-time-budget=5000", "--dump-dom", checked.as_uri(),
                    user_dir=tmp_path / "u")
    found = re.search(r"images-decoded (\d+)/(\d+) rows (\d+)", dom.stdout)
    assert found, dom.stdout[-2000:] + dom.stderr[-2000:]
    ok, total, rows = map(int, found.groups())
    assert total == 2 and ok == 2  # the accuracy-vs-latency scatter and the size bars
    assert rows == 1 + len(SWEEP_MODES)
    links = re.findall(r'href="([^"]+)"', text)
    assert len(links) == len(SWEEP_MODES) and all((out / link).is_file() for link in links)


def test_method_rows_convert_with_the_methods_they_name(trained_run, digits, calibration, tmp_path):
    """Rows asked for by name: ``int8-plain`` has no bias correction, ``int8-equalize`` equalizes the float
    model and keeps the default bias correction; each row's manifest says so, and the two models differ."""
    found = run_sweep(trained_run.model_path, representative=calibration, eval_dir=digits["val"],
                      out_dir=tmp_path, eval_limit=20, modes=("int8-plain", "int8-equalize"))
    rows = {row["mode"]: row for row in found.rows}
    assert list(rows) == ["int8-plain", "int8-equalize"]
    plain = json.loads(manifest_path_for(rows["int8-plain"]["path"]).read_text())
    equalized = json.loads(manifest_path_for(rows["int8-equalize"]["path"]).read_text())
    assert plain["settings"]["bias_correction"] is False and "equalize" not in plain["calibration"]["method"]
    assert equalized["settings"]["bias_correction"] is True and equalized["settings"]["equalize"] is True
    assert equalized["calibration"]["method"]["equalize"]["applied"]
    assert Path(rows["int8-plain"]["path"]).read_bytes() != Path(rows["int8-equalize"]["path"]).read_bytes()
