"""The real app in a real browser: `streamlit run` on a free loopback port, driven by Playwright + Chromium.

Selects two runs in the Runs table, opens every page, checks that charts and images render and that
no exception box appears, and saves one screenshot per page under test-artifacts/dashboard/.
Chromium: /usr/bin/chromium (`apt-get install -y chromium`). Missing it skips locally, fails on CI.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from procs import stop

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "dashboard" / "app.py"

pytestmark = [pytest.mark.browser, pytest.mark.server, pytest.mark.slow]

CHROMIUM = os.environ.get("DIFFENC_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts" / "dashboard"
ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _need_browser() -> None:
    why = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        why = "playwright (python) is not installed"
    if why is None and not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        why = f"no Chromium at {CHROMIUM} (apt-get install -y chromium chromium-driver)"
    if why:
        if ON_CI:
            pytest.fail(f"browser test cannot run on CI: {why}")
        pytest.skip(why)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(runs_dir, tmp_path_factory):
    _need_browser()
    port = _free_port()
    log = tmp_path_factory.mktemp("streamlit") / "server.log"
    env = dict(os.environ, DIFFENC_RUNS_DIR=str(runs_dir), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("DIFFENC_OPTUNA_STORAGE", None)
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
           "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none", "--client.toolbarMode", "minimal"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"streamlit exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"streamlit not ready after 60 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        # the app scrolls inside its own container: a tall viewport captures the whole page
        pg = browser.new_page(viewport={"width": 1500, "height": 2600})
        pg.set_default_timeout(45_000)
        pg.outside = []  # requests that leave the server: the page must load everything from it (issue 19)
        pg.on("request", lambda r: pg.outside.append(r.url) if not _local(r.url) else None)
        try:
            yield pg
        finally:
            browser.close()


def _local(url: str) -> bool:
    """A request the app's own server (or the page itself) answers."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.scheme in ("data", "blob", "about") or parts.hostname in ("127.0.0.1", "localhost")


def _settle(pg) -> None:
    """Wait until the app's script run has finished (the attribute Streamlit's own e2e tests use)."""
    pg.wait_for_timeout(250)
    pg.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=45_000)


def _no_exception(pg, where: str) -> None:
    boxes = pg.locator('[data-testid="stException"]')
    assert boxes.count() == 0, f"{where}: exception box: {boxes.first.inner_text()[:2000]}"


def _shot(pg, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def _visit(pg, title: str, plots: int = 0, images: int = 0) -> None:
    t0 = time.monotonic()
    pg.locator('[data-testid="stSidebarNav"] a', has_text=title).first.click()
    pg.wait_for_selector(f'h1:has-text("{title}")')
    if plots:
        _plots_drawn(pg, plots)
    if images:
        pg.wait_for_function("n => document.querySelectorAll('[data-testid=\"stImage\"] img').length >= n",
                             arg=images, timeout=45_000)
    _settle(pg)
    _no_exception(pg, title)
    print(f"{title}: {time.monotonic() - t0:.1f} s")  # shown with -s


def _plots_drawn(pg, at_least: int) -> None:
    """Wait until at least ``at_least`` plotly charts have drawn their SVG (tabs included)."""
    pg.wait_for_function(
        "n => document.querySelectorAll('[data-testid=\"stPlotlyChart\"] .js-plotly-plot .main-svg').length >= n",
        arg=at_least, timeout=45_000)


def _compared(pg) -> list[str]:
    """The runs in the sidebar's 'Runs to compare' picker (tag titles are 'id (method, dataset, β)')."""
    tags = pg.locator('[data-testid="stSidebar"] [data-testid="stMultiSelectTagsContainer"] [data-tag] > span[title]')
    return sorted(t.get_attribute("title").split(" (")[0] for t in tags.all())


def _wait_compared(pg, n: int) -> None:
    pg.wait_for_function(
        "n => document.querySelectorAll('[data-testid=\"stSidebar\"] [data-testid=\"stMultiSelectTagsContainer\"]"
        " [data-tag]').length === n", arg=n, timeout=20_000)


def test_pages_in_browser(server, page):
    pg = page
    pg.goto(server)
    pg.wait_for_selector('[data-testid="stDataFrame"]')
    _settle(pg)
    _no_exception(pg, "Runs")
    assert pg.locator('[data-testid="stAlert"]', has_text="broken").count() >= 1, "corrupt run not warned about"

    # select two runs in the table itself: filter to the two digits runs, tick both rows
    pg.get_by_label("Filter by name").fill("_digits")
    pg.get_by_label("Filter by name").press("Enter")
    pg.wait_for_selector(r"text=/^2 of \d+ run/")
    _settle(pg)
    for n, row in enumerate((1, 2), start=1):  # row 0 is the header; rows are 35 px; column 0 holds the tick box
        box = pg.locator('[data-testid="stDataFrame"]').first.bounding_box()
        pg.mouse.click(box["x"] + 18, box["y"] + 35 * row + 17)
        _wait_compared(pg, n)
        _settle(pg)
    assert _compared(pg) == ["diff_digits", "vae_digits"]
    assert pg.locator("text=Comparing:").count() == 1
    _shot(pg, "1_runs")

    # every page: wait for its charts/images, let the script run finish, then look for exception boxes
    _visit(pg, "Reconstructions", plots=1, images=6 * 5)  # 6 test images × (original + 2 runs × 2 reconstructions)
    pg.wait_for_function("() => [...document.querySelectorAll('[data-testid=\"stImage\"] img')]"
                         ".every(i => i.complete && i.naturalWidth > 0)")
    _shot(pg, "2_reconstructions")

    _visit(pg, "Latents", plots=3 + 1 + 2)  # per-dimension stats, histogram, a 2-D view per run
    _shot(pg, "3_latents")

    _visit(pg, "Training", plots=4)
    _shot(pg, "4_training")

    _visit(pg, "Rate–distortion", plots=1)
    chart = pg.locator('[data-testid="stPlotlyChart"]').first
    assert "Pareto front" in chart.inner_text() and "β=0.5" in chart.inner_text()
    _shot(pg, "5_rate_distortion")

    _visit(pg, "Tuning", plots=3)  # optuna's history, importances, parallel coordinates (+ intermediate values)
    assert pg.locator('[data-testid="stDataFrame"]').count() == 1
    _shot(pg, "6_tuning")

    # the selection survived every page switch
    assert _compared(pg) == ["diff_digits", "vae_digits"]
    # nothing was fetched from elsewhere (a :material/ page icon came from Google's font CDN)
    assert not pg.outside, sorted(set(pg.outside))

