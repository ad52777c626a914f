"""A real headless Chromium for page tests: Debian's `chromium` and `chromium-driver` packages
(`.ci/run` installs them), driven through selenium. Nothing is downloaded: the driver and the
browser are given by path, so selenium's manager never runs.

The flags keep Chromium off the network (this machine's network refuses its background
connections) and give it a fresh profile; chromedriver and the browser end with `quit()`.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

T = TypeVar("T")

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1100")

# The page's figures as data, read in one script run (the page cannot redraw in between):
# every data- attribute, kebab-case names made snake_case, values parsed as JSON (the page
# writes them so) or kept as text (a state).
READ_PAGE_JS = """
const parse = (v) => { try { return JSON.parse(v); } catch (e) { return v; } };
const attrs = (node) => {
  const out = {};
  for (const [k, v] of Object.entries(node.dataset)) out[k.replace(/[A-Z]/g, (c) => '_' + c.toLowerCase())] = parse(v);
  return out;
};
const byKey = (sel, key) => Object.fromEntries([...document.querySelectorAll(sel)].map(
  (n) => [n.dataset[key], parse(n.dataset.value)]));
const instances = [...document.querySelectorAll('#cluster .instance')].map((i) => {
  const inst = attrs(i);
  inst.id = inst.instance; delete inst.instance;
  inst.devices = [...i.querySelectorAll('.device')].map(attrs);
  return inst;
});
return {status: document.getElementById('status').dataset.status,
        time: parse(document.getElementById('main').dataset.time),
        serving: byKey('#serving [data-field]', 'field'), counters: byKey('#counters [data-counter]', 'counter'),
        instances, stale: document.body.classList.contains('stale')};
"""


def start_chromium(profile_dir: Path) -> webdriver.Chrome:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "install Debian's chromium and chromium-driver (.ci/run does)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def read_page(browser: webdriver.Chrome) -> dict[str, Any]:
    page: dict[str, Any] = browser.execute_script(READ_PAGE_JS)
    return page


def wait_for(what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.2) -> T:
    """Poll `check` until it returns something truthy (returned); fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
