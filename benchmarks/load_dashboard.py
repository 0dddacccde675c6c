"""The dashboard under load (issue 19): 1 000 runs and 8 browser sessions at once, in Chromium.

Builds ``--runs`` copies of one real, evaluated digits run (``benchmarks.dashboard_scale``), starts
the app as ``diffenc dashboard`` does (``streamlit run``, 127.0.0.1, a free port), and drives
``--sessions`` browser sessions at the same time (Playwright for Python, one headless Chromium, a
context per session). Each session opens the app and walks every page ``--rounds`` times; a page's
load time runs from the click (or the first ``goto``) until its script run has finished and every
chart and image on it has drawn (``script_*``: until the page saw its script run finish). Reports per
page the median, 95th percentile and slowest load, the CPU seconds the server and the browser used,
errors in the pages (exception boxes, uncaught errors, console errors) and in the server's log,
and the load average.

    python -m benchmarks.load_dashboard [--quick] [--runs 1000] [--sessions 8] [--rounds 3]

Chromium: ``/usr/bin/chromium`` (``DIFFENC_CHROMIUM``). Writes ``benchmarks/results/load_dashboard[_quick].json``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.common import Timer, Workspace, arg_parser, table, write_result
from benchmarks.dashboard_scale import build_folder
from benchmarks.servers import stop_group
from dashboard import launch

N_RUNS, N_RUNS_QUICK = 1000, 200
SESSIONS, SESSIONS_QUICK = 8, 3
ROUNDS, ROUNDS_QUICK = 3, 1
TARGET_P95_S = 3.0
CHROMIUM = os.environ.get("DIFFENC_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PAGES = ["Reconstructions", "Latents", "Training", "Rate–distortion", "Tuning", "Runs"]
PAGE_TIMEOUT_MS = 120_000  # a page that takes longer is a failure, not a measurement
READY_S = 120
SERVER_ERRORS = ("Traceback", "Error", "Exception")
DRAWN = """() => [...document.querySelectorAll('[data-testid="stPlotlyChart"]')]
                   .every(c => c.querySelector('.main-svg'))
             && [...document.querySelectorAll('[data-testid="stImage"] img')]
                   .every(i => i.complete && i.naturalWidth > 0)"""
IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(root: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """The app as ``diffenc dashboard --runs-dir ROOT`` starts it; (process, URL) once healthy."""
    port = free_port()
    env = {**launch.environment(root), "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(launch.command("127.0.0.1", port), env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=launch.APP.parents[1])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"streamlit did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


async def _loaded(page: Any, title: str, t0: float) -> dict[str, float]:
    """Wait until ``title``'s page has run its script and drawn every chart and image; the seconds
    since ``t0`` until the script run had finished (as the page saw it) and until all was drawn."""
    await page.wait_for_selector(f'h1:has-text("{title}")', timeout=PAGE_TIMEOUT_MS)
    await page.wait_for_selector(IDLE, timeout=PAGE_TIMEOUT_MS)
    script = time.perf_counter() - t0
    await page.wait_for_function(DRAWN, timeout=PAGE_TIMEOUT_MS)
    return {"script_s": script, "seconds": time.perf_counter() - t0}


async def session(browser: Any, url: str, index: int, rounds: int, start: asyncio.Event) -> dict[str, Any]:
    """One browser session: open the app, then every page ``rounds`` times; its timings and errors."""
    context = await browser.new_context(viewport={"width": 1400, "height": 1600})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    loads: list[dict[str, Any]] = []
    await start.wait()
    try:
        t0 = time.perf_counter()
        await page.goto(url, timeout=PAGE_TIMEOUT_MS)
        await page.wait_for_selector('[data-testid="stDataFrame"]', timeout=PAGE_TIMEOUT_MS)
        loads.append({"session": index, "page": "Runs (open)", **await _loaded(page, "Runs", t0)})
        for _ in range(rounds):
            for title in PAGES:
                t0 = time.perf_counter()
                await page.locator('[data-testid="stSidebarNav"] a', has_text=title).first.click()
                loads.append({"session": index, "page": title, **await _loaded(page, title, t0)})
                boxes = await page.locator('[data-testid="stException"]').count()
                if boxes:
                    errors.append(f"{title}: {boxes} exception box(es)")
    except Exception as err:  # a timeout: recorded, the other sessions go on
        errors.append(f"session {index}: {err.__class__.__name__}: {str(err).splitlines()[0]}")
    finally:
        await context.close()
    return {"loads": loads, "errors": errors}


async def drive(url: str, sessions: int, rounds: int, cpu: CpuMeter) -> list[dict[str, Any]]:
    from playwright.async_api import async_playwright

    cpu.start()
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            start = asyncio.Event()
            tasks = [asyncio.create_task(session(browser, url, i, rounds, start)) for i in range(sessions)]
            await asyncio.sleep(1.0)  # every context and page exists: they start together
            start.set()
            results = await asyncio.gather(*tasks)
            cpu.stop()
            return results
        finally:
            await browser.close()


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (linear interpolation, as numpy's default)."""
    v = sorted(values)
    if not v:
        return float("nan")
    k = (len(v) - 1) * q
    lo = int(k)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (k - lo)


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        stack += children.get(p, [])
    return out


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system, with reaped children's) of ``pids`` so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited
            continue
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / tick


class CpuMeter:
    """CPU seconds the app's server and the browser (this process's other descendants: Playwright's
    driver and Chromium) use between ``start()`` and ``stop()``; call ``stop()`` before the browser
    closes (the processes of a closed browser are gone from /proc)."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.server_s = self.browser_s = 0.0

    def _split(self) -> tuple[float, float]:
        server = _descendants(self.server_pid)
        others = [p for p in _descendants(os.getpid()) if p not in server and p != os.getpid()]
        return cpu_seconds(server), cpu_seconds(others)

    def start(self) -> None:
        self._start = self._split()

    def stop(self) -> None:
        end = self._split()
        self.server_s, self.browser_s = end[0] - self._start[0], end[1] - self._start[1]


class LoadSampler:
    """The 1-minute load average every 2 s, from a background thread."""

    def __init__(self) -> None:
        self.values: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(2.0):
            self.values.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--runs", type=int, default=None, help=f"run directories (default {N_RUNS}, quick {N_RUNS_QUICK})")
    ap.add_argument("--sessions", type=int, default=None, help=f"browser sessions at once (default {SESSIONS})")
    ap.add_argument("--rounds", type=int, default=None, help=f"walks over every page per session (default {ROUNDS})")
    args = ap.parse_args()
    n = args.runs or (N_RUNS_QUICK if args.quick else N_RUNS)
    sessions = args.sessions or (SESSIONS_QUICK if args.quick else SESSIONS)
    rounds = args.rounds or (ROUNDS_QUICK if args.quick else ROUNDS)
    timer = Timer()
    ws = Workspace(args.keep)
    root = build_folder(ws, n)
    log = ws.root / "streamlit.log"
    proc, url = start_app(root, log)
    print(f"{n} runs under {root}; {sessions} sessions × {rounds} round(s) on {url}", flush=True)
    try:
        cpu = CpuMeter(proc.pid)
        with LoadSampler() as load:
            t0 = time.perf_counter()
            results = asyncio.run(drive(url, sessions, rounds, cpu))
            drive_s = time.perf_counter() - t0
    finally:
        stop_group(proc)
    loads = [x for r in results for x in r["loads"]]
    page_errors = [e for r in results for e in r["errors"]]
    server_log = log.read_text(errors="replace")
    server_errors = [ln for ln in server_log.splitlines() if any(w in ln for w in SERVER_ERRORS)]
    rows = []
    for page in ["Runs (open)", *PAGES]:
        s = [x["seconds"] for x in loads if x["page"] == page]
        script = [x["script_s"] for x in loads if x["page"] == page]
        rows.append({"page": page, "loads": len(s), "median_s": percentile(s, 0.5), "p95_s": percentile(s, 0.95),
                     "max_s": max(s, default=float("nan")), "script_median_s": percentile(script, 0.5),
                     "script_p95_s": percentile(script, 0.95)})
    expected = sessions * (1 + rounds * len(PAGES))
    res = {"profile": "quick" if args.quick else "full", "n_runs": n, "sessions": sessions, "rounds": rounds,
           "load_average_start": timer.load_start, "pages": rows, "loads": loads, "expected_loads": expected,
           "page_errors": page_errors, "server_errors": server_errors[:50], "drive_seconds": drive_s,
           "load1_mean": sum(load.values) / max(1, len(load.values)), "load1_max": max(load.values, default=0.0),
           "target_p95_s": TARGET_P95_S, "chromium_args": CHROMIUM_ARGS, "server_cpu_s": cpu.server_s,
           "browser_cpu_s": cpu.browser_s}
    res["meets_target"] = (len(loads) == expected and not page_errors and not server_errors
                           and all(r["p95_s"] <= TARGET_P95_S for r in rows))
    res["wall_seconds"] = timer.seconds
    print(f"\n## Dashboard: {n} runs, {sessions} browser sessions at once, {rounds} round(s) of every page\n")
    print(table(rows, ["page", "loads", "median_s", "p95_s", "max_s", "script_median_s", "script_p95_s"], 3))
    print(f"\nCPU while driving ({drive_s:.0f} s): the app's server {cpu.server_s:.0f} s, the browser "
          f"{cpu.browser_s:.0f} s")
    print(f"\n{len(loads)}/{expected} page loads; page errors: {len(page_errors)}; server log errors: "
          f"{len(server_errors)}; load average {res['load1_mean']:.1f} (max {res['load1_max']:.1f}); "
          f"every page's p95 ≤ {TARGET_P95_S} s: {res['meets_target']}")
    for e in page_errors[:10] + server_errors[:10]:
        print("  ", e)
    print("wrote", write_result("load_dashboard", res, args.quick))
    if not args.keep:
        shutil.rmtree(ws.root, ignore_errors=True)


if __name__ == "__main__":
    main()
