"""The live cluster page (`GET /dashboard`) in a real headless Chromium, against a real 2-worker
server under a small burst that preempts; then the server goes away (the page says so and
keeps its data) and another one starts on the same port (the page follows it). The last test
checks the Grafana example against the metrics a live server exports.

KV is made scarce (--device-memory 280MiB: 65 blocks of 16 tokens per instance) and the burst
is 8 requests of 225 prompt tokens (each its own first token: no shared prefix) and 60 out:
four prompts fit an instance's KV (4 x 15 blocks), four whole requests do not (4 x 18), so
decoding preempts.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from browser import read_page, start_chromium, wait_for
from grafana_check import check_grafana_dashboard
from selenium import webdriver
from selenium.webdriver.common.by import By
from serverproc import MODEL, ServerProcess, free_port, stop_server

CLUSTER_ARGS = ("--devices", "2", "--device-memory", "280MiB", "--max-model-len", "512")
BURST, PROMPT_TOKENS, OUTPUT_TOKENS = 8, 225, 60
INSTANCE_FIELDS = ("id", "state", "running", "waiting", "kv_used_blocks", "kv_total_blocks", "waiting_blocks",
                   "demand_blocks", "page_size")
DEVICE_FIELDS = ("rank", "pid", "host", "device", "layers", "alive", "param_bytes", "kv_used_bytes",
                 "kv_total_bytes", "kv_free_bytes")
STATIC_DEVICE_FIELDS = ("rank", "pid", "host", "device", "layers", "alive", "param_bytes", "kv_total_bytes")
SERVING_FIELDS = ("running", "waiting", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s",
                  "output_tokens_per_s", "requests_finished")


class Live:
    """The module's server on one port: the browser test stops it and starts another in its place."""

    def __init__(self, factory: Callable[..., ServerProcess]) -> None:
        self.factory, self.port = factory, free_port()
        self.server: ServerProcess | None = None

    def start(self, *args: str) -> ServerProcess:
        self.server = self.factory(*args, port=self.port)
        return self.server

    def running(self) -> ServerProcess:
        """The server now up, or a new 1-device one."""
        if self.server is None or self.server.proc.poll() is not None:
            return self.start()
        return self.server


@pytest.fixture(scope="module")
def live(server_factory: Callable[..., ServerProcess]) -> Live:
    return Live(server_factory)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    driver = start_chromium(tmp_path / "chromium-profile")
    try:
        yield driver
    finally:
        driver.quit()


def get_cluster(server: ServerProcess) -> dict[str, Any]:
    resp = httpx.get(server.url + "/v1/cluster", headers=server.headers, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()


def view(snapshot: dict[str, Any], part: str) -> Any:
    """The part of a snapshot (from /v1/cluster or read from the page) that is compared."""
    if part == "serving":
        return {k: snapshot["serving"].get(k) for k in SERVING_FIELDS}
    if part == "counters":
        return snapshot["counters"]
    inst_fields, dev_fields = (("id",), STATIC_DEVICE_FIELDS) if part == "static" else (INSTANCE_FIELDS, DEVICE_FIELDS)
    return [{**{k: i.get(k) for k in inst_fields}, "devices": [{k: d.get(k) for k in dev_fields} for d in i["devices"]]}
            for i in snapshot["instances"]]


def wait_agree(browser: webdriver.Chrome, server: ServerProcess, parts: tuple[str, ...],
               timeout: float = 30.0) -> dict[str, Any]:
    """Wait until the page shows what /v1/cluster says (the page polls once a second); return
    that snapshot."""
    diffs: dict[str, Any] = {}

    def check() -> dict[str, Any] | None:
        cluster, page = get_cluster(server), read_page(browser)
        diffs.clear()
        diffs.update({p: {"cluster": view(cluster, p), "page": view(page, p)} for p in parts
                      if view(cluster, p) != view(page, p)})
        return cluster if not diffs and page["status"] == "live" else None

    try:
        return wait_for(f"the page to agree with /v1/cluster on {parts}", check, timeout)
    except AssertionError as e:
        raise AssertionError(f"{e}\ndifferences: {diffs}") from None


def texts(browser: webdriver.Chrome, selector: str) -> list[str]:
    return [e.text for e in browser.find_elements(By.CSS_SELECTOR, selector)]


def marks(browser: webdriver.Chrome, kind: str) -> int:
    return len(browser.find_elements(By.CSS_SELECTOR, f'#kvchart .event[data-kind="{kind}"]'))


def burst(server: ServerProcess, results: list[Any]) -> list[threading.Thread]:
    def one(k: int) -> None:
        prompt = [500 + k] + [1000 + i for i in range(PROMPT_TOKENS - 1)]  # distinct from the first token
        body = {"model": MODEL, "prompt": prompt, "max_tokens": OUTPUT_TOKENS, "ignore_eos": True}
        try:
            results.append(httpx.post(server.url + "/v1/completions", json=body, headers=server.headers,
                                      timeout=300).status_code)
        except httpx.HTTPError as e:
            results.append(e)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(BURST)]
    for t in threads:
        t.start()
    return threads


def screenshot(browser: webdriver.Chrome, path: Path) -> None:
    """The whole page, beyond the window (DevTools' Page.captureScreenshot)."""
    width, height = browser.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))
    assert path.stat().st_size > 10_000


def test_dashboard_follows_a_live_cluster(live: Live, browser: webdriver.Chrome, tmp_path: Path) -> None:
    server = live.start(*CLUSTER_ARGS)
    # The page is open, its data is not.
    page = httpx.get(server.url + "/dashboard", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(server.url + "/dashboard/static/main.js", timeout=10).status_code == 200
    assert httpx.get(server.url + "/v1/cluster", timeout=10).status_code == 401

    browser.get(server.url + "/dashboard")
    wait_for("the page to ask for the key", lambda: read_page(browser)["status"] == "needs-key", 20)
    assert browser.find_element(By.ID, "keyform").is_displayed()
    assert "needs an API key" in browser.find_element(By.ID, "banner").text
    assert not browser.find_element(By.ID, "main").is_displayed()  # no data without the key
    browser.find_element(By.ID, "key").send_keys("not-the-key")
    browser.find_element(By.ID, "keysubmit").click()
    wait_for("the page to say the key was refused", lambda: "refused" in browser.find_element(By.ID, "banner").text, 10)
    browser.find_element(By.ID, "key").send_keys(server.api_key or "")
    browser.find_element(By.ID, "keysubmit").click()
    first = wait_agree(browser, server, ("static",))
    assert len(first["instances"]) == 2 and [len(i["devices"]) for i in first["instances"]] == [1, 1]

    # A burst: the page follows it, and marks the preemptions on its timeline.
    results: list[Any] = []
    threads = burst(server, results)
    wait_for("a preemption on the page's timeline", lambda: marks(browser, "preemption"), 120, interval=0.5)
    wait_agree(browser, server, ("static", "instances"), timeout=60)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#kvchart path.series[data-rank]")) == 2
    assert browser.find_element(By.CSS_SELECTOR, '#eventlegend [data-kind="preemption"]').is_displayed()
    screenshot(browser, tmp_path / "dashboard.png")
    if os.environ.get("KUNLITE_DASHBOARD_SCREENSHOT"):  # to refresh docs/images/dashboard.png
        shutil.copy(tmp_path / "dashboard.png", os.environ["KUNLITE_DASHBOARD_SCREENSHOT"])
    for t in threads:
        t.join(300)
    assert results == [200] * BURST

    # Idle: every figure agrees, and the visible text says what the data attributes hold.
    idle = wait_agree(browser, server, ("static", "instances", "serving", "counters"))
    assert idle["counters"]["preemptions"] >= 1 and idle["serving"]["requests_finished"] == BURST
    # Every preemption /v1/cluster reports is marked at its time, and listed.
    preempted = {e["time"] for e in idle["events"] if e["kind"] == "preemption"}
    marked = {float(g.get_attribute("data-time"))
              for g in browser.find_elements(By.CSS_SELECTOR, '#kvchart .event[data-kind="preemption"]')}
    assert preempted and preempted <= marked, (preempted, marked)
    assert len(browser.find_elements(By.CSS_SELECTOR, '#events li[data-kind="preemption"]')) == min(len(preempted), 20)
    assert texts(browser, '#serving [data-field="requests_finished"] .value') == [str(BURST)]
    for inst, text in zip(idle["instances"], texts(browser, "#cluster .instance-figures"), strict=True):
        assert f"{inst['running']} running" in text and f"{inst['waiting']} waiting" in text, text
        assert f"KV {inst['kv_used_blocks']}/{inst['kv_total_blocks']} blocks" in text, text
    num_layers = max(d["layers"][1] for i in idle["instances"] for d in i["devices"])
    device_texts = texts(browser, "#cluster .device")
    for inst in idle["instances"]:
        for d in inst["devices"]:
            layers = f"layers {d['layers'][0]}–{d['layers'][1] - 1} of {num_layers}"
            assert any(f"rank {d['rank']}" in t and layers in t for t in device_texts), (d, device_texts)
    # Nothing came from anywhere but the server, and the browser logged no error (the 401s aside).
    origins = browser.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
    assert origins and all(url.startswith(server.url + "/") for url in origins), origins
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert all("401" in m for m in errors), errors

    # The server goes away: an error state, not a blank, with the last data kept.
    stop_server(server)
    wait_for("the page to say the server is unreachable", lambda: read_page(browser)["status"] == "unreachable", 20)
    banner = browser.find_element(By.ID, "banner")
    assert banner.is_displayed() and "unreachable since" in banner.text
    gone = read_page(browser)
    assert gone["stale"] and browser.find_element(By.ID, "main").is_displayed()
    assert all(view(gone, p) == view(idle, p) for p in ("instances", "serving", "counters"))
    screenshot(browser, tmp_path / "dashboard-unreachable.png")

    # Another server on the same port, with one instance: the page follows it, and keeps its timeline.
    server = live.start()
    back = wait_agree(browser, server, ("static", "instances", "serving", "counters"), timeout=30)
    assert len(back["instances"]) == 1 and not read_page(browser)["stale"]
    assert not browser.find_element(By.ID, "banner").is_displayed()
    assert marks(browser, "preemption") >= 1


# The page's own modules, in the browser, on snapshots today's server cannot produce (the
# parameter-centric states, events and merged groups): they draw whatever they are given.
RENDER_JS = """
const [snapshots, done] = arguments;
Promise.all([import('./dashboard/static/cluster.js'), import('./dashboard/static/timeline.js')]).then(([c, t]) => {
  const box = document.createElement('div');
  const svg = (h) => {
    const n = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
    n.setAttribute('height', h);
    return n;
  };
  const nodes = {kv: svg(160), queue: svg(120), kvLegend: document.createElement('div'),
                 queueLegend: document.createElement('div'), eventLegend: document.createElement('div'),
                 events: document.createElement('ol')};
  document.body.append(box, ...Object.values(nodes));
  const history = new t.History(300);
  for (const snap of snapshots) history.add(snap);
  c.renderCluster(box, snapshots[snapshots.length - 1].instances);
  t.renderTimeline(nodes, history, snapshots[snapshots.length - 1].time);
  done({
    instances: [...box.querySelectorAll('.instance')].map((i) => ({state: i.dataset.state, text: i.textContent,
      layers: [...i.querySelectorAll('.device')].map((d) => JSON.parse(d.dataset.layers))})),
    marks: [...nodes.kv.querySelectorAll('.event')].map(
      (g) => [g.dataset.kind, g.querySelector('line').getAttribute('stroke')]),
    ranks: [...nodes.kv.querySelectorAll('path.series')].map((p) => p.dataset.rank),
    legend: nodes.eventLegend.textContent,
  });
}, (e) => done({error: String(e)}));
"""


def snapshot(t: float, groups: list[tuple[int, str, list[tuple[int, int, int]]]], events: list[dict[str, Any]]) -> dict:
    """A /v1/cluster body: groups of (instance id, state, [(rank, first layer, end layer)])."""
    def device(rank: int, l0: int, l1: int) -> dict[str, Any]:
        return {"rank": rank, "pid": 100 + rank, "host": "h", "device": "cpu", "layers": [l0, l1], "alive": True,
                "param_bytes": (l1 - l0) * 10, "kv_used_bytes": 50, "kv_total_bytes": 300 - (l1 - l0) * 10,
                "kv_free_bytes": 250 - (l1 - l0) * 10}
    instances = [{"id": i, "state": state, "running": 1, "waiting": 2, "kv_used_blocks": 1, "kv_total_blocks": 9,
                  "waiting_blocks": 3, "demand_blocks": 4, "page_size": 16, "devices": [device(*d) for d in devs]}
                 for i, state, devs in groups]
    return {"object": "cluster", "time": t, "overload_policy": "parameter", "instances": instances, "counters": {},
            "events": events, "serving": {"running": 2, "waiting": 4}}


def test_dashboard_draws_states_events_and_groups_it_does_not_know(live: Live, browser: webdriver.Chrome) -> None:
    server = live.running()
    browser.get(server.url + "/dashboard")
    t0 = 1.8e9
    events = [{"time": t0 + 5, "kind": "drop", "instance": 0, "detail": "layers 15-30"},
              {"time": t0 + 6, "kind": "exchange", "instance": 0, "detail": ""},
              {"time": t0 + 8, "kind": "brand_new_kind", "instance": 0, "detail": "x"}]
    snaps = [snapshot(t0, [(0, "serving", [(0, 0, 30)]), (1, "serving", [(1, 0, 30)])], []),
             snapshot(t0 + 5, [(0, "dropping", [(0, 0, 15)]), (1, "serving", [(1, 0, 30)])], events[:1]),
             snapshot(t0 + 10, [(0, "exchanging", [(0, 0, 15), (1, 15, 30)])], events)]
    out = browser.execute_async_script(RENDER_JS, snaps)
    assert "error" not in out, out
    [group] = out["instances"]  # two instances merged into one group of two devices
    assert group["state"] == "exchanging" and "exchanging" in group["text"] and "group of 2 devices" in group["text"]
    assert group["layers"] == [[0, 15], [15, 30]]
    assert "layers 0–14 of 30" in group["text"] and "layers 15–29 of 30" in group["text"]
    assert "NaN" not in group["text"] and "undefined" not in group["text"]
    colours = dict(out["marks"])
    assert set(colours) == {"drop", "exchange", "brand_new_kind"}
    assert all(re.fullmatch(r"#[0-9a-f]{6}", str(c)) for c in colours.values()), colours  # a default for the new kind
    assert len(set(colours.values())) == 3
    assert out["ranks"] == ["0", "1"] and "brand new kind ×1" in out["legend"]


def test_grafana_dashboard_uses_exported_metrics(live: Live) -> None:
    server = live.running()
    text = httpx.get(server.url + "/metrics", timeout=10).text
    examples = Path(__file__).parents[2] / "examples" / "grafana"
    check_grafana_dashboard(examples / "kunlite.json", text)
    # The scrape config keeps kunlite's `instance` label (see examples/grafana/README.md).
    [job] = yaml.safe_load((examples / "prometheus.yml").read_text())["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["honor_labels"] is True
