"""The inspector's HTML page of a run (tasks/lot_report.py), from real runs: a small bottle lot
(2 good, 2 defective, 3 broken files) audited against v1, then re-evaluated against v2.

The page is checked as a file (structure, relative links, order without JavaScript), from object
storage (SeaweedFS), and in headless Chromium (Debian's chromium + chromium-driver, through
selenium): no failed request, no console error, every image decoded, click-to-sort and the
filter work; a screenshot goes to ``test-artifacts/`` (``ANOMALYDINO_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from anomalydino_core.thresholds import MIN_SCREENING_IMAGES
from flows.audit import audit_lot
from flows.config import PipelineConfig
from flows.reevaluate import reevaluate
from flows.screen import screen_shipment
from tasks.lot_report import files_uri_of, write_lot_report
from tasks.lot_report_data import histogram
from tasks.report import table_bytes, to_table
from tasks.storage import filesystem, join
from tests.pipeline_data import fast_config, lot_files, reference_files, write_local

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("ANOMALYDINO_TEST_ARTIFACTS", REPO / "test-artifacts"))


@dataclass(frozen=True)
class Runs:
    cfg: PipelineConfig
    audit_report: str
    audit_page: Path
    reeval_report: str
    reeval_page: Path
    changed: list
    screen_report: str
    screen_page: Path


@pytest.fixture(scope="module")
def runs(request, mvtec_root, tmp_path_factory) -> Runs:
    request.getfixturevalue("prefect_harness")
    root = tmp_path_factory.mktemp("lot-report") / "pipeline"
    refs = root / "references" / "bottle"
    write_local(refs / "v1", reference_files(mvtec_root))
    write_local(root / "incoming" / "bottle" / "lot-1", lot_files(mvtec_root))
    cfg = PipelineConfig.model_validate(fast_config(str(root)))
    audit = audit_lot("bottle", "lot-1", cfg)
    shutil.copytree(refs / "v1", refs / "v2")
    write_local(refs / "v2", reference_files(mvtec_root, ("005.png",)))
    result = reevaluate("bottle", "v2", cfg)
    (lot,) = result.lots
    # a shipment with enough readable images for a threshold of its own
    shipment = root / "incoming" / "bottle" / "shipment-1"
    write_local(shipment, lot_files(mvtec_root))
    good = mvtec_root / "bottle" / "test" / "good"
    extra = [f"good/{i:03d}.png" for i in range(2, 2 + MIN_SCREENING_IMAGES - 4)]
    write_local(shipment, {rel: (good / rel.split("/")[1]).read_bytes() for rel in extra})
    screen = screen_shipment("bottle", "shipment-1", cfg)
    # the runs wrote their pages themselves
    for s in (audit, lot, screen):
        assert s.html_uri and Path(s.html_uri).is_file()
    return Runs(
        cfg,
        audit.report_uri,
        Path(write_lot_report(audit.report_uri)),
        lot.report_uri,
        Path(write_lot_report(lot.report_uri)),
        result.changed,
        screen.report_uri,
        Path(screen.html_uri),
    )


class Page(HTMLParser):
    """Tags with their attributes, the table rows, and the text of a page."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.rows: list[dict] = []
        self.text: list[str] = []
        self._row: dict | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "tr" and "data-verdict" in a:
            self._row = {"verdict": a["data-verdict"], "values": []}
            self.rows.append(self._row)
        elif tag == "td" and self._row is not None and "data-value" in a:
            self._row["values"].append(a["data-value"])

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str) -> list[dict]:
        return [a for t, a in self.tags if t == tag]

    @property
    def plain(self) -> str:
        return " ".join(" ".join(self.text).split())


def check_links_stay_inside(page: Page, html: Path) -> None:
    """Every src/href is a fragment or a relative path to a file of the run's folder."""
    files = html.parent / (html.name.removesuffix(".html") + "_files")
    for tag, attrs in page.tags:
        for key in ("src", "href"):
            link = attrs.get(key)
            if link is None or (key == "href" and link.startswith("#")):
                continue
            assert ":" not in link and not link.startswith("/"), f"<{tag} {key}={link}>"
            target = (html.parent / unquote(link)).resolve()
            assert target.is_file() and target.is_relative_to(files.resolve()), link


def test_page_reads_without_javascript(runs: Runs) -> None:
    html = runs.audit_page
    assert html.name == Path(runs.audit_report).name.replace(".parquet", ".html")
    page = Page(html.read_text())
    df = pd.read_parquet(runs.audit_report)
    # landmarks, language, headings
    tags = {t for t, _ in page.tags}
    assert {"header", "nav", "main", "footer", "h1", "caption"} <= tags
    assert page.all("html")[0]["lang"] == "en"
    # the table: one row per image, by score descending, unscored rows last
    assert len(page.rows) == len(df) == 7
    scores = [float(r["values"][1]) for r in page.rows if r["values"][1]]
    assert scores == sorted(df["score"].dropna(), reverse=True)
    assert [r["verdict"] for r in page.rows[len(scores) :]] == ["error"] * 3
    assert all(a.get("scope") in ("col", "row") for a in page.all("th"))
    assert [a for a in page.all("th") if a.get("aria-sort")] == [
        {"scope": "col", "data-type": "num", "aria-sort": "descending"}
    ]
    # a card per flagged image, with its picture and its overlay, and the references
    flagged = df[df["verdict"] == "anomalous"]
    assert len(flagged) == 2
    assert len([a for a in page.all("li") if a.get("class") == "card"]) == 2
    imgs = page.all("img")
    assert len(imgs) == 2 * 2 + 3 and all(a.get("alt", "").strip() for a in imgs)
    assert all(int(a["width"]) > 0 and int(a["height"]) > 0 for a in imgs)
    check_links_stay_inside(page, html)
    text = page.plain
    for fact in ("bottle", "lot-1", df["run_id"][0], "reference_loo", "v1",
                 df["weights_sha256"][0], "efficientnet_lite0"):  # fmt: skip
        assert fact in text
    assert f"{df['threshold'][0]:.4f}" in text
    for reason in ("not a recognised image format", "image file is truncated", "empty file"):
        assert reason in text
    svg = [a for t, a in page.tags if t == "svg" and "histogram" in a.get("class", "")]
    assert len(svg) == 1 and svg[0]["role"] == "img"


def test_reevaluation_page_shows_old_threshold_and_changed_verdicts(runs: Runs) -> None:
    page = Page(runs.reeval_page.read_text())
    text = page.plain
    old = pd.read_parquet(runs.audit_report)
    new = pd.read_parquet(runs.reeval_report)
    assert "re-evaluation" in text and "Changed verdicts" in text
    assert f"Previous threshold {old['threshold'][0]:.4f}" in text
    if runs.changed:
        for c in runs.changed:
            assert c.image_id in text
    else:
        assert "No verdict changed" in text
    assert "v2" in text and len(page.rows) == len(new)
    check_links_stay_inside(page, runs.reeval_page)


def test_page_from_object_storage(runs: Runs, request, tmp_path: Path) -> None:
    """The same page written to S3: every link resolves inside the objects written."""
    s3env = request.getfixturevalue("s3")
    bucket_uri = s3env.new_bucket("report")
    report = join(bucket_uri, "reports/bottle/lot-1", Path(runs.audit_report).name)
    fs, path = filesystem(report, s3env.storage)
    fs.pipe_file(path, Path(runs.audit_report).read_bytes())
    html_uri = write_lot_report(report, s3env.storage)
    assert html_uri == report.removesuffix(".parquet") + ".html"
    local = tmp_path / "down"
    fs.get(path.rsplit("/", 1)[0] + "/", str(local), recursive=True)
    html = local / Path(html_uri).name
    assert (local / Path(files_uri_of(report)).name).is_dir()
    page = Page(html.read_text())
    assert len(page.all("img")) == 7
    check_links_stay_inside(page, html)


def test_missing_source_and_overlay_are_named_not_fatal(runs: Runs, tmp_path: Path) -> None:
    """A flagged image whose source, thumbnail and overlay are gone: its anomaly map alone (from
    the Zarr archive, on the lot's scale) and a note instead of a broken picture."""
    table = pq.read_table(runs.audit_report)
    meta = json.loads(table.schema.metadata[b"anomalydino"])
    meta["thumbs_uri"] = str(tmp_path / "no-thumbs")
    table = table.replace_schema_metadata(
        {**table.schema.metadata, b"anomalydino": json.dumps(meta).encode()}
    )
    df = table.to_pandas()
    top = df["score"].idxmax()
    df.loc[top, "image_uri"] = str(tmp_path / "gone.png")
    df.loc[top, "overlay_uri"] = str(tmp_path / "gone-overlay.png")
    report = tmp_path / "reports" / Path(runs.audit_report).name
    report.parent.mkdir()
    fixed = pa.Table.from_pandas(df, schema=table.schema, preserve_index=False)
    pq.write_table(fixed.replace_schema_metadata(table.schema.metadata), report)
    html = Path(write_lot_report(str(report)))
    page = Page(html.read_text())
    assert "Image not available" in page.plain and "anomaly map only" in page.plain
    assert len(page.all("img")) == 2 * 2 + 3 - 1
    check_links_stay_inside(page, html)


def test_without_thumbnails_or_map_archive_the_full_pngs_are_decoded(
    runs: Runs, tmp_path: Path
) -> None:
    """A report without ``thumbs_uri`` and ``maps_uri`` (an older run): every card's image is
    decoded from its source and its overlay from the overlay PNG; the page is the same."""
    table = pq.read_table(runs.audit_report)
    meta = json.loads(table.schema.metadata[b"anomalydino"])
    assert meta["thumbs_uri"] and meta["maps_uri"]
    del meta["thumbs_uri"], meta["maps_uri"]
    report = tmp_path / Path(runs.audit_report).name
    pq.write_table(
        table.replace_schema_metadata(
            {**table.schema.metadata, b"anomalydino": json.dumps(meta).encode()}
        ),
        report,
    )
    html = Path(write_lot_report(str(report)))
    page = Page(html.read_text())
    assert len(page.all("img")) == 7 and "anomaly map only" not in page.plain
    check_links_stay_inside(page, html)


def test_run_without_threshold_or_rows(tmp_path: Path) -> None:
    """An empty shipment screened without a threshold still gets a page."""
    meta = {"product": "bottle", "lot": "empty", "run_id": "r1", "method": "zero_shot",
            "threshold": None, "threshold_source": "none"}  # fmt: skip
    report = tmp_path / "r1.parquet"
    report.write_bytes(table_bytes(to_table([], meta)))
    text = Page(Path(write_lot_report(str(report))).read_text()).plain
    assert "no threshold, nothing flagged" in text and "No image of this run has a score" in text


def test_histogram_bins_split_at_the_threshold() -> None:
    scores = [0.01 * i for i in range(1, 60)]
    hist = histogram(scores, 0.237, 0.3)
    assert sum(b.count for b in hist.bars) == len(scores)
    assert all(b.lo >= 0.237 - 1e-9 or b.hi <= 0.237 + 1e-9 for b in hist.bars)
    assert hist.n_above == sum(s > 0.237 for s in scores)
    assert hist.threshold.x < hist.old_threshold.x


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no chromium binary (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    driver_path = shutil.which("chromedriver") or "/usr/lib/chromium/chromedriver"
    assert Path(driver_path).exists(), "chromium found but no chromedriver (chromium-driver)"
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--no-first-run", "--disable-extensions"):  # fmt: skip
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def table_scores(driver) -> list[float | None]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#all-images tbody tr'))"
        ".filter(r => !r.hidden).map(r => { const v = r.cells[3].dataset.value;"
        " return v === '' ? null : parseFloat(v); });"
    )


def test_page_in_headless_chromium(runs: Runs, browser) -> None:
    from selenium.webdriver.common.by import By

    html = runs.audit_page
    browser.get(html.as_uri())
    assert browser.execute_script("return document.readyState") == "complete"
    assert browser.title.startswith("bottle / lot-1: 2 flagged of 7")
    # every image decoded
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete,"
        " i.naturalWidth]);"
    )
    assert len(images) == 7 and all(ok and w > 0 for _, ok, w in images), images
    # click-to-sort: the score header first reverses the server's order, then the image header
    head = browser.find_element(
        By.XPATH, "//table[@id='all-images']//th[normalize-space()='Score']"
    )
    head.find_element(By.TAG_NAME, "button").click()
    scores = table_scores(browser)
    scored = [s for s in scores if s is not None]
    assert scored == sorted(scored) and scores[len(scored) :] == [None] * 3
    assert head.get_attribute("aria-sort") == "ascending"
    browser.find_element(By.XPATH, "//th[normalize-space()='Image']/button").click()
    ids = browser.execute_script(
        "return Array.from(document.querySelectorAll('#all-images tbody th')).map(c =>"
        " c.textContent.trim());"
    )
    assert ids == sorted(ids)
    head.find_element(By.TAG_NAME, "button").send_keys("\n")  # the keyboard sorts too
    assert head.get_attribute("aria-sort") == "descending"
    assert [s for s in table_scores(browser) if s is not None] == sorted(scored, reverse=True)
    # the filter box (shown by the script) keeps the matching rows
    box = browser.find_element(By.ID, "filter-text")
    assert box.is_displayed()
    box.send_keys("truncated")
    assert len(table_scores(browser)) == 1
    box.clear()
    box.send_keys(" ")  # an input event with an empty query
    assert len(table_scores(browser)) == 7
    # a full-page screenshot as the test's artefact
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(int(height) + 40, 8000))
    browser.execute_script("document.activeElement.blur(); window.scrollTo(0, 0);")
    assert browser.save_screenshot(str(ARTIFACTS / "lot_report.png"))
    # nothing failed to load, nothing but the run's files was requested, no console error
    perf = [json.loads(e["message"])["message"] for e in browser.get_log("performance")]
    failed = [m["params"] for m in perf if m["method"] == "Network.loadingFailed"]
    assert failed == []
    urls = {
        m["params"]["request"]["url"] for m in perf if m["method"] == "Network.requestWillBeSent"
    }
    base = html.parent.as_uri() + "/"
    assert urls and all(u.startswith(base) for u in urls), sorted(urls)
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert errors == []


@pytest.mark.parametrize("which", ["reeval", "screen"])
def test_reevaluation_and_screening_pages_in_headless_chromium(runs: Runs, browser, which) -> None:
    """The same load checks on the re-evaluation and screening pages: every image decoded, the
    score column sorts, nothing failed or was requested from outside the run's files, no
    console error; a screenshot of each."""
    from selenium.webdriver.common.by import By

    html = {"reeval": runs.reeval_page, "screen": runs.screen_page}[which]
    report = {"reeval": runs.reeval_report, "screen": runs.screen_report}[which]
    browser.set_window_size(1280, 1000)
    browser.get_log("performance")  # drop the entries of earlier pages
    browser.get_log("browser")
    browser.get(html.as_uri())
    assert browser.execute_script("return document.readyState") == "complete"
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete,"
        " i.naturalWidth]);"
    )
    df = pd.read_parquet(report)
    n_flagged = int((df["verdict"] == "anomalous").sum())
    assert n_flagged >= 1 and len(images) >= 2 * n_flagged
    assert all(ok and w > 0 for _, ok, w in images), images
    head = browser.find_element(
        By.XPATH, "//table[@id='all-images']//th[normalize-space()='Score']"
    )
    head.find_element(By.TAG_NAME, "button").click()
    scored = [v for v in table_scores(browser) if v is not None]
    assert scored == sorted(scored) and len(scored) == df["score"].notna().sum()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / f"lot_report_{which}.png"))
    perf = [json.loads(e["message"])["message"] for e in browser.get_log("performance")]
    assert [m["params"] for m in perf if m["method"] == "Network.loadingFailed"] == []
    base = html.parent.as_uri() + "/"
    urls = {m["params"]["request"]["url"] for m in perf
            if m["method"] == "Network.requestWillBeSent"}  # fmt: skip
    assert urls and all(u.startswith(base) for u in urls), sorted(urls)
    assert [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")] == []
