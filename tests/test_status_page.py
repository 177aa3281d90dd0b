"""The status page (server/static/index.html) in a real headless Chromium, against a live uvicorn server.

Needs Debian's ``chromium`` + ``chromium-driver`` (/usr/bin/chromium, /usr/bin/chromedriver) and the
``selenium`` package; the module is skipped when any of them is missing. Selenium never downloads a driver
here: both binaries are given explicitly.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from helpers import daytime_config
from redis_servers import redis_binaries

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn is not installed (the server extra)")
pytest.importorskip("fastapi", reason="fastapi is not installed (the server extra)")

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from clawq.broker import Broker  # noqa: E402
from clawq.server.app import create_app  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    if os.environ.get("CI"):  # CI installs them (.ci/run): a skip there would hide a broken page
        raise RuntimeError(f"CI must provide {CHROMIUM} and {CHROMEDRIVER}")
    pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)",
                allow_module_level=True)

# The page does not depend on the Redis version: run on one server binary only, to keep the module quick.
_BINARIES = list(redis_binaries())[:1]
pytestmark = [pytest.mark.slow, pytest.mark.parametrize("redis_server", _BINARIES, indirect=True)]

SHOT = Path("/tmp/clawq-status-page.png")
TOKEN = "s3cret-page-token"


# --- a real server and a real browser -----------------------------------------------------------------


class LiveServer:
    """uvicorn serving ``app`` in a thread on 127.0.0.1:<free port>; ``stop()`` shuts it down."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
        assert not self.thread.is_alive(), "uvicorn did not stop"


@contextmanager
def serving(broker: Broker, token: str | None = None) -> Iterator[LiveServer]:
    live = LiveServer(create_app(broker, token=token))
    try:
        yield live
    finally:
        if live.thread.is_alive():
            live.stop()
        else:
            live.sock.close()


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    profile = tempfile.mkdtemp(prefix="clawq-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1280,1300", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        drv.set_page_load_timeout(15)
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def queue(broker: Broker) -> dict[str, Any]:
    """Four boards: two running (opus, codex), one backing off after a failed run, one paused; sonnet cooling."""
    broker.clock = time.time  # a real clock, so cooldowns and elapsed times move while the page watches
    broker.load_config(daytime_config(time.time()))  # the day cap (6) and "Day", whatever the hour
    front = broker.add("frontend", "Build the login page", model="opus")
    broker.add("frontend", "Write the <b>login</b> tests & docs", model="opus")
    broker.add("backend", "Add the /tasks endpoint", model="codex")
    broker.add("docs", "Document the API", model="glm")
    broker.add("ops", "Rotate the keys", model="sonnet")
    broker.pause("ops")
    claims = {c.board: c for c in (broker.claim(), broker.claim(), broker.claim())}
    assert set(claims) == {"frontend", "backend", "docs"} and claims["frontend"].task_id == front
    broker.fail(claims["docs"].task_id, claims["docs"].run_id, "HTTP 529 overloaded_error: Overloaded")
    broker.set_cooldown("sonnet", 600)
    return {"claims": claims}


@pytest.fixture
def page(driver: Any, broker: Broker, queue: dict[str, Any]) -> Iterator[tuple[Any, LiveServer]]:
    """The page open on a live server with the queue above, its lanes rendered."""
    driver.set_window_size(1280, 1300)
    with serving(broker) as live:
        driver.get(live.url + "/")
        wait_for(driver, lambda d: len(lanes(d)) == 4, "four board lanes")
        yield driver, live
    driver.get("about:blank")  # no page left polling a stopped server


def wait_for(driver: Any, cond: Callable[[Any], Any], what: str, timeout: float = 6) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(cond, f"timed out waiting for {what}")


# One atomic read of what the page shows (the page re-renders every 2 s, so element handles go stale).
_SNAPSHOT_JS = """
const all = (css) => Array.from(document.querySelectorAll(css));
const txt = (root, css) => { const e = root.querySelector(css); return e ? e.innerText.trim() : null; };
const gauges = (css, attr) => Object.fromEntries(all(css).map((g) => [g.getAttribute(attr),
  {count: txt(g, ".count"), cooldown: txt(g, ".cooldown"), text: g.innerText}]));
return {
  lanes: Object.fromEntries(all("#boards .lane").map((l) => [l.dataset.board,
    {why: l.dataset.why, text: l.innerText, run: txt(l, ".run"), x: Math.round(l.getBoundingClientRect().x)}])),
  models: gauges("#models .gauge", "data-model"),
  providers: gauges("#providers .gauge", "data-provider"),
  errors: all("#errors .error").map((e) => ({cause: txt(e, ".cause"), text: e.innerText})),
  load: txt(document, "#load"), mode: txt(document, "#mode"), banner: txt(document, "#banner"),
  bold: all("#boards b").length,
};
"""


def snap(driver: Any) -> dict[str, Any]:
    return dict(driver.execute_script(_SNAPSHOT_JS))


def lanes(driver: Any) -> dict[str, Any]:
    return dict(snap(driver)["lanes"])


def seconds(clock: str) -> int:
    """"9:58" -> 598, "1:00:05" -> 3605."""
    total = 0
    for part in clock.strip().split(":"):
        total = total * 60 + int(part)
    return total


# --- the tests ------------------------------------------------------------------------------------------


def test_lanes_gauges_errors_and_a_real_rendering(page: tuple[Any, LiveServer], queue: dict[str, Any]) -> None:
    driver, _ = page
    claims = queue["claims"]
    view = snap(driver)
    found = view["lanes"]
    assert sorted(found) == ["backend", "docs", "frontend", "ops"]
    for board in ("frontend", "backend"):
        assert f"#{claims[board].task_id}" in found[board]["run"] and claims[board].model in found[board]["run"]
    assert found["frontend"]["why"] == "board_busy"
    assert "Write the <b>login</b> tests & docs" in found["frontend"]["text"]  # escaped, shown as text
    assert view["bold"] == 0
    assert found["ops"]["why"] == "board_paused" and "paused" in found["ops"]["text"]
    assert found["docs"]["why"] == "backoff" and found["docs"]["run"] is None
    # gauges against their caps
    counts = {m: g["count"] for m, g in view["models"].items()}
    assert counts["opus"] == "1/2" and counts["codex"] == "1/2" and counts["glm"] == "0/4"
    assert view["providers"]["anthropic"]["count"] == "1/3" and view["providers"]["openai"]["count"] == "1/3"
    # the failed run, with its root cause
    error = view["errors"][0]
    assert error["cause"] == "overloaded"
    assert f"#{claims['docs'].task_id}" in error["text"] and "glm" in error["text"] and "Overloaded" in error["text"]
    assert view["load"] == "2 / 6 in progress" and "Day" in view["mode"]
    assert view["banner"] == ""
    # a screenshot that is a real rendering, not a blank page
    shot = Path(tempfile.mkdtemp(prefix="clawq-shot-")) / "status.png"
    assert driver.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    shutil.copyfile(shot, SHOT)
    try:
        from PIL import Image
    except ImportError:
        assert len(data) > 20_000, f"screenshot is only {len(data)} bytes: blank?"
    else:
        with Image.open(shot) as img:
            assert img.size[0] >= 1000 and img.size[1] >= 600
            colors = img.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 50, "screenshot has almost no colours: blank?"
    shutil.rmtree(shot.parent)


def test_cooldown_counts_down_between_refreshes(page: tuple[Any, LiveServer]) -> None:
    driver, _ = page
    models = snap(driver)["models"]
    assert models["opus"]["cooldown"] is None
    first = seconds(models["sonnet"]["cooldown"])
    assert 590 <= first <= 600
    later = wait_for(driver, lambda d: (s := seconds(snap(d)["models"]["sonnet"]["cooldown"])) < first and s,
                     "the countdown to tick", 4)
    assert first - 3 <= later < first


def test_page_updates_itself(page: tuple[Any, LiveServer], broker: Broker) -> None:
    driver, _ = page
    task = broker.add("research", "Survey queue brokers", model="gemini3")
    claim = broker.claim()
    assert claim.task_id == task
    started = time.monotonic()
    run = wait_for(driver, lambda d: (snap(d)["lanes"].get("research") or {}).get("run"), "the new lane", 5)
    assert f"#{task}" in run and "gemini3" in run and "Survey queue brokers" in run
    assert time.monotonic() - started < 5
    view = snap(driver)
    assert view["models"]["gemini3"]["count"] == "1/3" and view["load"] == "3 / 6 in progress"


def test_phone_viewport_has_no_horizontal_scroll(page: tuple[Any, LiveServer]) -> None:
    driver, _ = page
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
    try:
        wait_for(driver, lambda d: d.execute_script("return window.innerWidth") == 390, "the phone viewport")
        wide = driver.execute_script(
            "const e = document.documentElement; return [e.scrollWidth, e.clientWidth, document.body.scrollWidth]")
        assert wide[0] <= wide[1] and wide[2] <= wide[1], f"horizontal scroll at 390 px: {wide}"
        xs = {lane["x"] for lane in lanes(driver).values()}
        assert len(xs) == 1, f"lanes are not in one column: x = {xs}"
        driver.save_screenshot(str(SHOT.with_name("clawq-status-page-phone.png")))
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_stale_banner_when_the_server_stops(page: tuple[Any, LiveServer]) -> None:
    driver, live = page
    banner = driver.find_element(By.ID, "banner")
    assert not banner.is_displayed()
    assert banner.get_attribute("aria-live") and banner.get_attribute("role") == "alert"
    live.stop()
    wait_for(driver, lambda d: banner.is_displayed(), "the stale banner", 8)
    assert re.search(r"stale|disconnected", banner.text, re.I)
    assert "stale" in (driver.find_element(By.ID, "main").get_attribute("class") or "")
    assert len(lanes(driver)) == 4, "the last known state stays on the page"


def test_token_from_the_page_url(driver: Any, broker: Broker, queue: dict[str, Any]) -> None:
    with serving(broker, token=TOKEN) as live:
        driver.get(live.url + "/?token=wrong")
        assert "invalid bearer token" in driver.find_element(By.TAG_NAME, "body").text
        driver.get(f"{live.url}/?token={TOKEN}")
        wait_for(driver, lambda d: len(lanes(d)) == 4, "lanes fetched with the bearer token")
        view = snap(driver)
        assert view["models"]["opus"]["count"] == "1/2" and view["banner"] == ""
        driver.get("about:blank")


def test_provider_gauges_show_the_breaker_state(page: tuple[Any, LiveServer], broker: Broker) -> None:
    driver, _ = page
    assert "closed" in snap(driver)["providers"]["google"]["text"]
    broker.open_breaker("google", 10)
    text = wait_for(driver, lambda d: "open" in (t := snap(d)["providers"]["google"]["text"]) and t,
                    "the open breaker", 5)
    left = driver.execute_script(
        "return document.querySelector('#providers [data-provider=google] .breaker').innerText")
    assert 590 <= seconds(left) <= 600 and "operator" in text
    assert "closed" in snap(driver)["providers"]["anthropic"]["text"]
    broker.close_breaker("google")
    wait_for(driver, lambda d: "closed" in snap(d)["providers"]["google"]["text"], "the closed breaker", 5)
