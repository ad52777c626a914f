// The live cluster page: polls /v1/cluster once a second and draws what it gets.
//
// The API key, when the server has one, is asked for in a form, kept in sessionStorage (this
// tab only) and sent as `Authorization: Bearer ...`; it is never put in a URL. A failed poll
// does not blank the page: it keeps the last data, greyed, under a banner that says since
// when the server has been unreachable (or that it needs a key, or is loading), and polling
// goes on, so that the page picks the server up again after a restart.

import { renderCluster, renderCounters, renderServing } from "./cluster.js";
import { clock } from "./fmt.js";
import { History, renderTimeline } from "./timeline.js";

const POLL_MS = 1000;
const TIMEOUT_MS = 4000;
const WINDOW_S = 300;
const KEY_ITEM = "kunlite-api-key";
const CLUSTER_URL = "v1/cluster"; // relative: works behind a proxy that adds a path prefix

const $ = (id) => document.getElementById(id);
const history = new History(WINDOW_S);
const state = {
  last: null, // the latest snapshot
  clockOffset: 0, // server time - browser time, seconds
  failingSince: null, // browser time (ms) of the first failed poll in a row
  timer: null,
  polls: 0, // polls started; only the latest one schedules the next
};

function apiKey() {
  return sessionStorage.getItem(KEY_ITEM) || "";
}

/** One poll: {kind: "ok", data} | {kind: "key" | "unavailable" | "error" | "unreachable", message}. */
async function fetchCluster() {
  const key = apiKey();
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), TIMEOUT_MS);
  try {
    const resp = await fetch(CLUSTER_URL, {
      headers: key ? {Authorization: `Bearer ${key}`} : {}, cache: "no-store", signal: abort.signal,
    });
    let body = null;
    try { body = await resp.json(); } catch { body = null; }
    if (resp.ok && body && body.object === "cluster") return {kind: "ok", data: body};
    const message = (body && body.error && body.error.message) || `HTTP ${resp.status}`;
    if (resp.status === 401) return {kind: "key", message, sent: Boolean(key)};
    if (resp.status === 503) return {kind: "unavailable", message};
    return {kind: "error", message: `HTTP ${resp.status}: ${message}`};
  } catch (e) {
    return {kind: "unreachable", message: abort.signal.aborted ? "no answer within 4 s" : String(e.message || e)};
  } finally {
    clearTimeout(timer);
  }
}

function setStatus(status, text) {
  const chip = $("status");
  chip.dataset.status = status;
  chip.textContent = text;
}

function showBanner(kind, text) {
  const banner = $("banner");
  banner.dataset.kind = kind;
  banner.textContent = text;
  banner.hidden = false;
}

function onData(data) {
  state.last = data;
  state.clockOffset = data.time - Date.now() / 1000;
  state.failingSince = null;
  history.add(data);
  document.body.classList.remove("stale");
  $("banner").hidden = true;
  $("keyform").hidden = true;
  $("main").hidden = false;
  setStatus("live", "live");
  $("policy").textContent = `overload policy: ${data.overload_policy}`;
  $("updated").textContent = `updated ${clock(data.time)}`;
  $("main").dataset.time = JSON.stringify(data.time);
  renderServing($("serving"), data.serving);
  renderCounters($("counters"), data.counters);
  renderCluster($("cluster"), data.instances);
}

function onFailure(outcome) {
  if (state.failingSince === null) state.failingSince = Date.now();
  const since = clock(state.failingSince / 1000);
  const kept = state.last ? ` Showing the last data, from ${clock(state.last.time)}.` : "";
  document.body.classList.toggle("stale", Boolean(state.last));
  $("main").hidden = !state.last;
  if (outcome.kind === "key") {
    $("keyform").hidden = false;
    setStatus("needs-key", outcome.sent ? "key refused" : "needs API key");
    showBanner("key", (outcome.sent ? "The API key was refused: " : "This server needs an API key: ")
      + `${outcome.message}${kept}`);
    return;
  }
  const what = {unreachable: "Server unreachable", unavailable: "Server unavailable",
                error: "Server error"}[outcome.kind];
  setStatus(outcome.kind, outcome.kind);
  showBanner(outcome.kind, `${what} since ${since} (${outcome.message}).${kept} Retrying every second.`);
}

function draw() {
  const now = state.last ? Date.now() / 1000 + state.clockOffset : Date.now() / 1000;
  history.prune(now);
  const span = renderTimeline({kv: $("kvchart"), kvLegend: $("kvlegend"), queue: $("queuechart"),
                               queueLegend: $("queuelegend"), eventLegend: $("eventlegend"), events: $("events")},
                              history, now);
  $("span").textContent = `(last ${span / 60} min; kept for ${WINDOW_S / 60} min)`;
}

async function poll() {
  clearTimeout(state.timer);
  const mine = ++state.polls;
  const outcome = await fetchCluster();
  if (mine !== state.polls) return; // a newer poll (the key form's) took over
  if (outcome.kind === "ok") onData(outcome.data);
  else onFailure(outcome);
  if (state.last) draw();
  state.timer = setTimeout(poll, POLL_MS);
}

$("keyform").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_ITEM, $("key").value.trim());
  $("key").value = "";
  poll();
});

window.addEventListener("resize", () => { if (state.last) draw(); });
poll();
