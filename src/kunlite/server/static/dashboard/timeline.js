// The timeline of the last few minutes, kept by the page itself (the server sends only its
// present state and its recent events): KV use per device and the request queue, as SVG line
// charts, with the cluster's events marked as vertical lines across both.
//
// Devices are keyed by rank, so a device keeps its colour while its instance, its layer range,
// or the server behind the page (after a restart) changes. Unknown event kinds get a default
// colour; a gap in the samples (the server was unreachable) leaves a gap in the lines.

import { clock, el, svg, words } from "./fmt.js";

export const KIND_COLOURS = {
  preemption: "#d62728", swap_out: "#9467bd", swap_in: "#b497d6", migration: "#17becf",
  migration_aborted: "#8c564b", worker_death: "#111111", instance_restored: "#2ca02c",
  drop: "#ff7f0e", exchange: "#1f77b4", restore: "#7cb518",
};
const OTHER_KIND = "#8a8a8a";
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
const GAP_S = 5; // samples further apart than this are not joined
const QUEUE = [["running", "#2b8a3e"], ["waiting", "#e8590c"]];

export function kindColour(kind) {
  return KIND_COLOURS[kind] || OTHER_KIND;
}

function rankColour(rank) {
  return PALETTE[((Number(rank) % PALETTE.length) + PALETTE.length) % PALETTE.length];
}

/** What the page remembers: one sample per successful poll and every event seen, for windowS. */
export class History {
  constructor(windowS) {
    this.windowS = windowS;
    this.samples = []; // {t, kv: {rank: percent}, running, waiting}
    this.events = new Map(); // "time|kind|instance|detail" -> event
  }

  add(snapshot) {
    const kv = {};
    for (const inst of snapshot.instances) {
      for (const d of inst.devices) kv[d.rank] = d.kv_total_bytes ? (100 * d.kv_used_bytes) / d.kv_total_bytes : 0;
    }
    const last = this.samples[this.samples.length - 1];
    if (!last || snapshot.time > last.t) {
      this.samples.push({t: snapshot.time, kv, running: snapshot.serving.running, waiting: snapshot.serving.waiting});
    }
    for (const e of snapshot.events) this.events.set(`${e.time}|${e.kind}|${e.instance}|${e.detail}`, e);
    this.prune(snapshot.time);
  }

  prune(now) {
    const since = now - this.windowS;
    while (this.samples.length && this.samples[0].t < since) this.samples.shift();
    for (const [key, e] of this.events) if (e.time < since) this.events.delete(key);
  }

  /** Events in the window, oldest first. */
  recentEvents() {
    return [...this.events.values()].sort((a, b) => a.time - b.time);
  }

  ranks() {
    const seen = new Set();
    for (const s of this.samples) for (const r of Object.keys(s.kv)) seen.add(Number(r));
    return [...seen].sort((a, b) => a - b);
  }
}

/** The geometry of one chart: value -> pixel, for a window ending at `now`. */
function frame(node, now, windowS, yMax) {
  const width = Math.max(200, Math.round(node.getBoundingClientRect().width) || 1000);
  const height = Number(node.getAttribute("height")) || 120;
  const m = {left: 44, right: 10, top: 10, bottom: 18};
  node.setAttribute("viewBox", `0 0 ${width} ${height}`);
  return {
    width, height, m, now, windowS, yMax,
    x: (t) => m.left + ((t - (now - windowS)) / windowS) * (width - m.left - m.right),
    y: (v) => height - m.bottom - (Math.min(v, yMax) / yMax) * (height - m.top - m.bottom),
  };
}

function axes(f, yTicks, yLabel) {
  const out = [];
  for (const v of yTicks) {
    const y = f.y(v);
    out.push(svg("line", {class: "grid", x1: f.m.left, x2: f.width - f.m.right, y1: y, y2: y}));
    out.push(svg("text", {class: "tick", x: f.m.left - 4, y: y + 3, "text-anchor": "end", text: yLabel(v)}));
  }
  const step = f.windowS <= 60 ? 10 : f.windowS <= 180 ? 30 : 60;
  for (let ago = 0; ago <= f.windowS; ago += step) {
    const x = f.x(f.now - ago);
    const text = ago === 0 ? "now" : ago % 60 === 0 ? `-${ago / 60} min` : `-${ago} s`;
    out.push(svg("line", {class: "grid", x1: x, x2: x, y1: f.m.top, y2: f.height - f.m.bottom}));
    out.push(svg("text", {class: "tick", x, y: f.height - 4, "text-anchor": ago === 0 ? "end" : "middle", text}));
  }
  return out;
}

/** A polyline through (t, value) points, broken where samples are more than GAP_S apart. */
function line(f, points, colour, attrs) {
  let d = "";
  let prev = null;
  for (const [t, v] of points) {
    if (v === undefined || v === null) { prev = null; continue; }
    d += `${prev === null || t - prev > GAP_S ? "M" : "L"}${f.x(t).toFixed(1)},${f.y(v).toFixed(1)}`;
    prev = t;
  }
  return svg("path", {class: "series", d: d || "M0,0", stroke: colour, ...attrs});
}

function eventMarks(f, events) {
  return events.filter((e) => e.time >= f.now - f.windowS && e.time <= f.now + 1).map((e) => {
    const x = f.x(e.time);
    const colour = kindColour(e.kind);
    const title = `${clock(e.time)} ${words(e.kind)} on instance ${e.instance}${e.detail ? `: ${e.detail}` : ""}`;
    return svg("g", {class: "event", "data-kind": e.kind, "data-time": e.time, "data-instance": e.instance}, [
      svg("title", {text: title}),
      svg("line", {x1: x, x2: x, y1: f.m.top, y2: f.height - f.m.bottom, stroke: colour}),
      svg("path", {d: `M${x - 4},${f.m.top - 8}L${x + 4},${f.m.top - 8}L${x},${f.m.top}Z`, fill: colour}),
    ]);
  });
}

function swatch(colour) {
  const s = el("span", {class: "swatch"});
  s.style.background = colour;
  return s;
}

function niceMax(v) {
  const steps = [1, 2, 4, 5, 8, 10, 16, 20, 32, 40, 50, 64, 100, 128, 200, 256, 500, 1000];
  return steps.find((s) => s >= v) || Math.ceil(v / 1000) * 1000;
}

function emptyNote(f, text) {
  return svg("text", {class: "empty", x: f.width / 2, y: f.height / 2, "text-anchor": "middle", text});
}

/** Redraw both charts and their legends for a window ending at `now` (unix seconds); return
the span shown (seconds). */
export function renderTimeline(nodes, history, now) {
  const {samples} = history;
  const events = history.recentEvents();
  // The span shown grows with what the page has seen, from a minute to the whole window.
  const oldest = Math.min(now, ...samples.slice(0, 1).map((s) => s.t), ...events.slice(0, 1).map((e) => e.time));
  const windowS = Math.min(history.windowS, Math.max(60, Math.ceil((now - oldest) / 60) * 60));
  const ranks = history.ranks();

  const kv = frame(nodes.kv, now, windowS, 100);
  nodes.kv.replaceChildren(
    ...axes(kv, [0, 50, 100], (v) => `${v}%`),
    ...ranks.map((r) => line(kv, samples.map((s) => [s.t, s.kv[r]]), rankColour(r), {"data-rank": r})),
    ...eventMarks(kv, events),
    ...(samples.length ? [] : [emptyNote(kv, "waiting for data")]));
  nodes.kvLegend.replaceChildren(...ranks.map((r) => el("span", {class: "key"}, [swatch(rankColour(r)), `rank ${r}`])));

  const top = niceMax(Math.max(1, ...samples.map((s) => Math.max(s.running, s.waiting))));
  const q = frame(nodes.queue, now, windowS, top);
  nodes.queue.replaceChildren(
    ...axes(q, [0, top / 2, top], (v) => String(v)),
    ...QUEUE.map(([name, colour]) => line(q, samples.map((s) => [s.t, s[name]]), colour, {"data-series": name})),
    ...eventMarks(q, events),
    ...(samples.length ? [] : [emptyNote(q, "waiting for data")]));
  nodes.queueLegend.replaceChildren(
    ...QUEUE.map(([name, colour]) => el("span", {class: "key"}, [swatch(colour), name])));

  const counts = new Map();
  for (const e of events) counts.set(e.kind, (counts.get(e.kind) || 0) + 1);
  nodes.eventLegend.replaceChildren(...(counts.size
    ? [...counts].map(([kind, n]) => el("span", {class: "key", "data-kind": kind}, [swatch(kindColour(kind)),
                                                                                   `${words(kind)} ×${n}`]))
    : [el("span", {class: "muted", text: `no events in the last ${windowS / 60} min`})]));

  nodes.events.replaceChildren(...events.slice(-20).reverse().map((e) => el("li", {"data-kind": e.kind}, [
    swatch(kindColour(e.kind)),
    el("span", {class: "when", text: clock(e.time)}),
    el("span", {class: "what", text: words(e.kind)}),
    el("span", {class: "where", text: `instance ${e.instance}`}),
    el("span", {class: "detail", text: e.detail || ""}),
  ])));
  return windowS;
}
