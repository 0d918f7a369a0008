"""`report.html` (deployer.reports.html): the series it reads from a real history, then the page opened in a
real headless Chromium (Debian's `chromium` and `chromium-driver`, driven by selenium): no console error,
no network request, the matrix and the charts in the DOM, the selectors redrawing, board strings shown as
text. Nights are seeded through the history code (`begin_run`, `record_device`, `finish_run`), as
tests/test_run.py does. A screenshot of each page goes to $DEPLOY_TEST_ARTIFACTS (else the test's tmp_path).

The large history (50 devices x 20 metrics x 90 nights) is generated on /dev/shm where there is one: on disk
each device's transaction is fsynced (synchronous=FULL), 4,500 of them took 33 s here against 2.5 s on tmpfs.
Its open time is asserted only as a sanity bound; bench/report_html.py measures it (bench/README.md).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from deployer.errors import LocalStateError
from deployer.history.db import History
from deployer.history.records import DeviceResult, DeviceState, Fingerprint, ItemResult, Metric, Status
from deployer.history.report import run_report
from deployer.history.verdicts import judge
from deployer.reports.html import page, visible, write_html
from deployer.reports.series import Segment, SeriesKey, baselines, read_nights, segments

WAIT_S = 30  # every wait on the browser is bounded by this
HOSTILE = "evil<img src=x onerror=alert(1)>\x1b[31m"
POCL_A = Fingerprint("aaaaaaaaaaaaaaaa", "OpenCL 3.0 PoCL 3.1 / pthread")
POCL_B = Fingerprint("bbbbbbbbbbbbbbbb", "OpenCL 3.0 PoCL 3.1 / basic")
DAY = 86400.0
EPOCH = 1_796_000_000.0


# seeding


def seed_night(db: History, started: float, results: Sequence[DeviceResult], *, playbook: str = "nightly",
               status: str = "complete", judged: bool = False) -> int:
    run_id = db.begin_run(playbook, f"playbooks/{playbook}.yml", "0" * 64, "inventory/lab.yml",
                          [r.device for r in results], {}, started=started)
    for result in results:
        db.record_device(run_id, result)
    if judged:
        db.record_verdicts(run_id, judge(db, run_id, results))
    if status != "running":
        db.finish_run(run_id, "complete" if status == "complete" else "incomplete", ended=started + 600)
    return run_id


def board(name: str, started: float, items: Sequence[ItemResult], fingerprint: Fingerprint | None = POCL_A,
          *, state: DeviceState = "ok", reason: str = "") -> DeviceResult:
    return DeviceResult(name, state, started, started + 60, fingerprint, tuple(items), reason=reason)


def report_of(db: History, run_id: int) -> dict[str, Any]:
    info = db.run(run_id)
    assert info is not None
    return run_report(info, db.device_results(run_id), db.verdicts(run_id), history=str(db.path))


def generate_history(path: Path, *, devices: int = 50, metrics: int = 20, nights: int = 90,
                     seed: int = 20261130) -> tuple[int, dict[tuple[str, str, str, str], list[int]]]:
    """A fleet's nights through the history code: per device a push step (program start-up metrics), two
    models (first and steady inference), smoke cases and health; every 5th board's driver changes at 2/3 of
    the nights, every 7th board's first program slows down at 8/9 (its change point). The last night judged,
    with new failures, fixed, flaky and an offline board. Returns the last run's id and the change points."""
    rng = random.Random(seed)
    programs = [f"prog{k:02d}" for k in range((metrics - 4 + 1) // 2)]
    names = [f"board-{d:02d}" for d in range(devices)]
    level = {(d, m): rng.uniform(5, 50) for d in names for m in range(metrics)}
    changed, slowed = 2 * nights // 3, 8 * nights // 9
    run_ids: list[int] = []
    with History.open(path) as db:
        for night in range(nights):
            started = EPOCH + night * DAY
            last = night == nights - 1
            results = [_generated(d, n, night, started, metrics, programs, level, rng, last=last,
                                  changed=changed, slowed=slowed) for n, d in enumerate(names)]
            run_ids.append(seed_night(db, started, results, judged=last))
    points = {(d, "push", "", f"{programs[0]}.load_from_binary_ms"): [run_ids[slowed]]
              for n, d in enumerate(names) if n % 7 == 0}
    return run_ids[-1], points


def _generated(name: str, n: int, night: int, started: float, metrics: int, programs: list[str],
               level: dict[tuple[str, int], float], rng: random.Random, *, last: bool, changed: int,
               slowed: int) -> DeviceResult:
    fingerprint = POCL_B if n % 5 == 0 and night >= changed else POCL_A
    if last and n == 3:
        return board(name, started, [ItemResult("health", "health", "reachable", "fail",
                                                reason="connection refused"),
                                     ItemResult("push", "push", "", "miss", reason="device offline")],
                     None, state="offline", reason="reachable: connection refused")

    def value(m: int) -> float:
        shift = (1.3 if fingerprint is POCL_B else 1.0) * (1.5 if m == 0 and n % 7 == 0 and night >= slowed else 1)
        return round(level[(name, m)] * shift * rng.gauss(1, 0.04), 3)

    names = [f"{p}.{kind}" for p in programs for kind in ("load_from_binary_ms", "build_from_source_ms")]
    push = tuple(Metric(metric, value(m), "ms") for m, metric in enumerate(names[: metrics - 4]))
    models = [ItemResult("models", "push", f"model {model}", "pass", subject="m" * 64, metrics=(
        Metric("first_inference_ms", value(metrics - 4 + 2 * k), "ms"),
        Metric("steady_ms", value(metrics - 3 + 2 * k), "ms"))) for k, model in enumerate(("tiny_cnn", "mobilenet"))]
    saxpy: Status = "fail" if last and n % 10 == 1 else "pass"
    relu: Status = "pass" if last or n % 10 != 2 else "fail"
    return board(name, started, [
        ItemResult("health", "health", "reachable", "pass"), ItemResult("health", "health", "opencl", "pass"),
        ItemResult("push", "push", "", "pass", subject="p" * 64, metrics=push), *models,
        ItemResult("smoke", "smoke", "case saxpy[f32]", saxpy, subject="s" * 64,
                   reason="y: max |err| 3.2 > tolerance 1e-05" if saxpy == "fail" else ""),
        ItemResult("smoke", "smoke", "case relu[f32]", relu, subject="r" * 64),
        ItemResult("smoke", "smoke", "case gemm[f32]", "pass", subject="g" * 64, flaky=last and n % 10 == 4,
                   attempts=2 if last and n % 10 == 4 else 1)], fingerprint)


@pytest.fixture
def fast_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder on tmpfs where there is one (see the module docstring), else the test's tmp_path."""
    if not os.access("/dev/shm", os.W_OK):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="deployer-report-", dir="/dev/shm"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


# the series, without a browser


@pytest.mark.parametrize(("fingerprints", "expected"), [
    ([], []),
    ([None, None], []),
    ([("a", "A")] * 3, [Segment("a", "A", 0, 2)]),
    ([("a", "A"), ("a", "A"), ("b", "B"), ("b", "B2")], [Segment("a", "A", 0, 1), Segment("b", "B2", 2, 3)]),
    ([None, ("a", "A"), None, ("b", "B"), None], [Segment("a", "A", 0, 2), Segment("b", "B", 3, 4)]),
    ([("a", "A"), ("b", "B"), ("a", "A")], [Segment("a", "A", 0, 0), Segment("b", "B", 1, 1),
                                            Segment("a", "A", 2, 2)]),
])
def test_segments_start_where_the_fingerprint_id_changes(fingerprints: list[tuple[str, str] | None],
                                                        expected: list[Segment]) -> None:
    assert segments(fingerprints) == expected


def test_each_segment_gets_a_baseline_without_the_reported_night() -> None:
    values = [10.0, 11.0, 12.0, 13.0, None, 20.0, 21.0, 22.0, 99.0]
    cuts = [Segment("a", "A", 0, 4), Segment("b", "B", 5, 8)]
    first, second = baselines(values, cuts, current=8)
    assert (first.first, first.last, first.median, first.count) == (0, 4, 11.5, 4)
    assert first.iqr == pytest.approx(1.5) and first.low == pytest.approx(10.0)
    assert (second.first, second.last, second.median, second.count) == (5, 8, 21.0, 3)  # 99 left out
    assert baselines([1.0, 2.0, 3.0], [Segment("a", "A", 0, 2)], current=2) == []  # 2 values: too few


def test_nights_are_the_runs_of_the_playbook_up_to_the_reported_one(tmp_path: Path) -> None:
    with History.open(tmp_path / "history.db") as db:
        def night(day: int, value: float | None, **options: Any) -> int:
            metrics = () if value is None else (Metric("steady_ms", value, "ms"),)
            return seed_night(db, EPOCH + day * DAY, [board("pi-01", EPOCH, [
                ItemResult("models", "push", "model tiny", "pass", metrics=metrics)])], **options)

        first = night(0, 1.0)
        night(1, 99.0, playbook="other")  # another playbook's run is not a night of this one
        night(2, math.inf)  # not a finite number: not drawn
        night(3, 99.0, status="running")  # a run still going (or killed) is left out
        third = night(4, 3.0)
        reported = night(5, 4.0, status="running")  # the reported run counts even while running
        night(6, 99.0)  # later than the reported run
        past = read_nights(db, reported)
        assert [n.run_id for n in past.nights][0] == first and past.nights[-1].run_id == reported
        key = SeriesKey("pi-01", "models", "model tiny", "steady_ms")
        assert past.series[key].values == (1.0, None, 3.0, 4.0) and past.series[key].unit == "ms"
        assert key == ("pi-01", "models", "model tiny", "steady_ms")
        assert [n.run_id for n in read_nights(db, reported, nights=2).nights] == [third, reported]
        assert past.fingerprints["pi-01"] == ((POCL_A.id, POCL_A.label),) * 4


class Tags(HTMLParser):
    """The elements of a page as a browser's tokenizer finds them (a script's text ends at its first </script)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: set[str] = set()
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.add(tag)
        self.scripts += tag == "script"


def test_board_strings_are_shown_as_text_never_as_markup(tmp_path: Path) -> None:
    with History.open(tmp_path / "history.db") as db:
        run_id = seed_night(db, EPOCH, [board(HOSTILE, EPOCH, [
            ItemResult("smoke</script>", "smoke", "case <b>x</b>", "fail", reason="bad\x07 <script>alert(1)</script>",
                       metrics=(Metric("t</script><script>alert(2)</script>", 1.0, "\u2028ms"),))],
            Fingerprint("cccccccccccccccc", "<script>alert(3)</script>"))], judged=True)
        text = page(report_of(db, run_id), read_nights(db, run_id))
    assert "<img" not in text and "alert(1)</script>" not in text and "alert(3)</script>" not in text
    assert "evil&lt;img src=x onerror=alert(1)&gt;\\x1b[31m" in text and "bad\\x07 &lt;script&gt;" in text
    tags = Tags()
    tags.feed(text)  # plotly's config, plotly.js, its figure, the data, the page's script: nothing else
    assert tags.scripts == 5 and tags.found <= {"html", "head", "meta", "title", "style", "body", "header", "h1", "h2",
                                                "h3", "section", "table", "thead", "tbody", "tr", "th", "td", "div",
                                                "ul", "li", "b", "span", "code", "small", "br", "a", "i", "p",
                                                "label", "select", "script", "footer"}, tags.found
    data = text.rsplit('id="report-data">', 1)[1].split("</script>", 1)[0]
    assert "\u2028" not in data and json.loads(data)["devices"][0]["name"] == visible(HOSTILE)
    assert visible("a\x1b\x7f\u200b\nb") == "a\\x1b\\x7f\\u200b\nb"


def test_the_file_is_replaced_whole_and_nothing_else_is_left(tmp_path: Path) -> None:
    with History.open(tmp_path / "history.db") as db:
        run_id = seed_night(db, EPOCH, [board("pi-01", EPOCH, [ItemResult("smoke", "smoke", "case a", "pass")])])
        report = report_of(db, run_id)
        out = tmp_path / "out" / "report.html"
        write_html(report, db, run_id, out)
        out.write_text("old")
        write_html(report, db, run_id, out)
        assert out.read_text().startswith("<!DOCTYPE html>") and os.listdir(out.parent) == ["report.html"]
        (tmp_path / "file").write_text("")
        with pytest.raises(LocalStateError, match="cannot write"):
            write_html(report, db, run_id, tmp_path / "file" / "report.html")
        with pytest.raises(ValueError, match="not 9"):
            write_html(report, db, 9, out)


# in a real browser


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run scripts/install.sh --test")
    return found


def start_browser() -> WebDriver:
    """Headless Chromium (as root: --no-sandbox) behind a proxy that leads nowhere, logging its console and
    its network events (the performance log)."""
    options = webdriver.ChromeOptions()
    options.binary_location = _tool("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000", "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
                     "--disable-background-networking", "--disable-component-update", "--no-first-run"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=_tool("chromedriver")))
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    return driver


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    driver = start_browser()
    try:
        yield driver
    finally:
        driver.quit()


def browser_log(driver: WebDriver, kind: str) -> list[dict[str, Any]]:
    """The entries of one of the browser's logs since the last read (selenium's get_log has no annotations)."""
    entries: list[dict[str, Any]] = driver.get_log(kind)  # type: ignore[no-untyped-call]
    return entries


def open_page(driver: WebDriver, path: Path) -> dict[str, float]:
    """Open the file and wait (bounded) for its load and its first chart; the page's own timings in ms
    from navigation start: load end, first chart drawn, the later of the two (the open time), and the first
    contentful paint (-1 if none yet)."""
    browser_log(driver, "browser"), browser_log(driver, "performance")  # drop what earlier pages left
    driver.get(path.as_uri())
    timings: dict[str, float] = WebDriverWait(driver, WAIT_S).until(lambda d: d.execute_script("""
        const nav = performance.getEntriesByType("navigation")[0];
        const drawn = performance.getEntriesByName("report:first-chart")[0];
        const paint = performance.getEntriesByName("first-contentful-paint")[0];
        if (!nav || !nav.loadEventEnd || !drawn) return null;
        return {load: nav.loadEventEnd, chart: drawn.startTime, open: Math.max(nav.loadEventEnd, drawn.startTime),
                paint: paint ? paint.startTime : -1};
    """))
    return timings


def assert_quiet(driver: WebDriver, path: Path) -> None:
    """No console error, and no network request but the page itself (and data: URLs)."""
    errors = [e for e in browser_log(driver, "browser") if e["level"] == "SEVERE"]
    assert errors == []
    requests = [json.loads(e["message"])["message"] for e in browser_log(driver, "performance")]
    urls = [m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"]
    assert path.as_uri() in urls  # the log did see the page's own request
    assert [u for u in urls if u != path.as_uri() and not u.startswith("data:")] == []


def screenshot(driver: WebDriver, name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A screenshot of the whole page (up to 6000 px high) where CI keeps artifacts; its path is printed
    past pytest's capture, so it shows in the test output."""
    folder = Path(os.environ.get("DEPLOY_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(max(int(height), 800), 6000))
    driver.execute_script("window.scrollTo(0, 0)")
    target = folder / name
    assert driver.save_screenshot(str(target)), target
    with capsys.disabled():
        print(f"\nscreenshot: {target}")
    driver.set_window_size(1400, 1000)
    return target


def shown(driver: WebDriver) -> list[str]:
    """The series drawn now: [device, step, item, metric]."""
    series: list[str] = json.loads(driver.execute_script("return document.getElementById('chart').dataset.series"))
    return series


def redrawn(driver: WebDriver, before: list[str]) -> list[str]:
    WebDriverWait(driver, WAIT_S).until(lambda d: shown(d) != before)
    return shown(driver)


def seed_small_fleet(db: History) -> tuple[int, dict[SeriesKey, list[int]]]:
    """Ten nights of four boards: pi-01's driver changes at night 6 (and its relu load slows there), pi-02
    gets a new failure, a fix and a flaky result tonight, pi-04 is offline tonight, and a board with a
    hostile name and fingerprint label."""
    ids = []
    for night in range(10):
        started, last = EPOCH + night * DAY, night == 9
        results = []
        for name in ("pi-01", "pi-02", HOSTILE, "pi-04"):
            if last and name == "pi-04":
                results.append(board(name, started, [
                    ItemResult("health", "health", "reachable", "fail", reason="connection refused\x07"),
                    ItemResult("smoke", "smoke", "case saxpy[f32]", "miss", reason="device offline")],
                    None, state="offline", reason="reachable: connection refused\x07"))
                continue
            moved = name == "pi-01" and night >= 6
            fingerprint = POCL_B if moved else Fingerprint("dddddddddddddddd", "<script>alert(3)</script>") \
                if name == HOSTILE else POCL_A
            push = ItemResult("push", "push", "", "pass", subject="p" * 64, metrics=(
                Metric("relu.load_from_binary_ms", (30.0 if moved else 10.0) + night % 3, "ms"),
                Metric("saxpy.load_from_binary_ms", 5.0 + night % 2, "ms")))
            model = ItemResult("models", "push", "model tiny_cnn", "pass", subject="m" * 64, metrics=(
                Metric("first_inference_ms", 100.0 + night, "ms"),
                Metric("steady_ms", 2.0 + (3 if name == "pi-02" and last else 0) + 0.1 * (night % 4), "ms")))
            saxpy: Status = "fail" if last and name == "pi-02" else "pass"
            relu: Status = "fail" if name == "pi-02" and night == 8 else "pass"
            results.append(board(name, started, [
                ItemResult("health", "health", "reachable", "pass"), push, model,
                ItemResult("smoke", "smoke", "case saxpy[f32]", saxpy, subject="s" * 64,
                           reason="y: max |err| 3.2 > tolerance 1e-05" if saxpy == "fail" else ""),
                ItemResult("smoke", "smoke", "case relu[f32]", relu, subject="r" * 64),
                ItemResult("smoke", "smoke", "case gemm[f32]", "pass", subject="g" * 64,
                           flaky=last and name == "pi-02", attempts=2 if last and name == "pi-02" else 1)],
                fingerprint))
        ids.append(seed_night(db, started, results, judged=last))
    return ids[-1], {SeriesKey("pi-01", "push", "", "relu.load_from_binary_ms"): [ids[6]],
                     SeriesKey("pi-02", "models", "model tiny_cnn", "steady_ms"): [ids[9]]}


def test_the_page_in_a_real_browser(browser: WebDriver, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with History.open(tmp_path / "history.db") as db:
        run_id, points = seed_small_fleet(db)
        report = report_of(db, run_id)
        out = tmp_path / "report.html"
        write_html(report, db, run_id, out, change_points=points)
    assert report["summary"]["verdicts"]["new_failure"] == 1 and report["summary"]["offline"] == 1
    open_page(browser, out)
    assert browser.execute_script("return document.querySelectorAll('.js-plotly-plot .main-svg').length") > 0
    rows = browser.execute_script("return [...document.querySelectorAll('#matrix tbody tr')]"
                                  ".map(r => r.getAttribute('data-device'))")
    assert rows == [visible(d["name"]) for d in report["devices"]] and len(rows) == 4
    marked = browser.execute_script("return ['new_failure', 'fixed', 'flaky'].map(k => [...document"
                                    ".querySelectorAll('#matrix td.v-' + k)].map(c => c.closest('tr').dataset.device))")
    assert marked == [["pi-02"], ["pi-02"], ["pi-02"]]
    assert visible(HOSTILE) in rows  # the hostile name is a row, as text
    injected = "img, #summary script, #matrix-section script, #fingerprints script"
    assert browser.execute_script(f"return document.querySelectorAll('{injected}').length") == 0
    assert "pi-04: reachable: connection refused\\x07" in browser.find_element("id", "summary").text
    # the first chart: the series with a change point tonight, its change point and tonight's ring drawn
    first = shown(browser)
    assert first == ["pi-02", "models", "model tiny_cnn", "steady_ms"]
    names = browser.execute_script("return document.getElementById('chart').data.map(t => t.name)")
    assert {"value", "change point", "this run", "baseline median ± IQR"} <= set(names), names
    # another device: its driver change is drawn, and the metric picked before is kept
    Select(browser.find_element("id", "device")).select_by_visible_text("pi-01")
    second = redrawn(browser, first)
    assert second == ["pi-01", "models", "model tiny_cnn", "steady_ms"]
    notes = browser.execute_script("return [...document.querySelectorAll('#chart .annotation-text')]"
                                   ".map(a => a.textContent)")
    assert notes == ["driver changed"]
    Select(browser.find_element("id", "metric")).select_by_visible_text("push · relu.load_from_binary_ms")
    third = redrawn(browser, second)
    assert third == ["pi-01", "push", "", "relu.load_from_binary_ms"]
    assert browser.execute_script("return document.getElementById('chart').data.length") >= 5
    screenshot(browser, "report-html.png", tmp_path, capsys)  # this chart: a driver change and a change point
    # clicking a device in the matrix shows its chart
    browser.find_element("css selector", "#matrix tr[data-device='pi-02'] a.pick").click()
    assert redrawn(browser, third)[0] == "pi-02"
    fingerprints = browser.find_element("id", "fingerprint-table").text
    assert "<script>alert(3)</script>" in fingerprints and "1 change(s)" in fingerprints
    assert_quiet(browser, out)


def test_a_large_history_stays_small_and_opens(browser: WebDriver, fast_folder: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """50 devices x 20 metrics x 90 nights: the file is at most 10 MB, library included; it opens (load end
    and first chart drawn) well within a sanity bound. bench/report_html.py measures the real figure."""
    start = time.monotonic()
    run_id, points = generate_history(fast_folder / "history.db")
    generated = time.monotonic() - start
    with History.open(fast_folder / "history.db") as db:
        report = report_of(db, run_id)
        out = tmp_path / "report.html"
        start = time.monotonic()
        write_html(report, db, run_id, out, change_points=points)
        written = time.monotonic() - start
        assert sum(1 for key in read_nights(db, run_id).series if key.device == "board-00") == 20
    size = out.stat().st_size
    try:
        timings = open_page(browser, out)
    except WebDriverException as exc:  # pragma: no cover - the message says what the browser did
        pytest.fail(f"the page did not open: {exc}")
    with capsys.disabled():
        print(f"\nlarge report: {size / 1e6:.2f} MB, generated in {generated:.1f} s, written in {written:.1f} s, "
              f"opened in {timings['open']:.0f} ms (load {timings['load']:.0f} ms, first chart "
              f"{timings['chart']:.0f}, first paint {timings['paint']:.0f})")
    assert size <= 10_000_000
    assert timings["open"] < 30_000  # a sanity bound only: the 3 s target is measured by bench/report_html.py
    assert browser.execute_script("return document.querySelectorAll('#matrix tbody tr').length") == 50
    assert len(browser.find_element("id", "device").find_elements("tag name", "option")) == 50
    screenshot(browser, "report-html-large.png", tmp_path, capsys)
    assert_quiet(browser, out)
