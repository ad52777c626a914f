// The figures of the latest /v1/cluster snapshot: serving tiles, overload counters, and one box
// per instance holding one bar per device. Every figure carries its raw value in a data-
// attribute (JSON), so that a test can compare the page with /v1/cluster.
//
// Nothing here assumes today's states, counters, or shapes: any state string, any counter name,
// any number of instances and devices, layer ranges that change from one snapshot to the next.

import { bytes, data, el, number, seconds, words } from "./fmt.js";

const SERVING = [
  ["running", "running", (v) => number(v)],
  ["waiting", "waiting", (v) => number(v)],
  ["ttft_p50_s", "TTFT p50", seconds],
  ["ttft_p99_s", "TTFT p99", seconds],
  ["tpot_p50_s", "TPOT p50", seconds],
  ["tpot_p99_s", "TPOT p99", seconds],
  ["output_tokens_per_s", "output tokens/s", (v) => number(v, 1)],
  ["requests_finished", "finished", (v) => number(v)],
];

function tile(attrs, label, text, title) {
  return el("div", {class: "tile", title, ...attrs}, [
    el("div", {class: "label", text: label}),
    el("div", {class: "value", text}),
  ]);
}

/** Running and waiting now; TTFT, TPOT and tokens/s over the server's window (a minute). */
export function renderServing(root, serving) {
  const window = serving.window_s ? `over the last ${number(serving.window_s)} s` : "";
  root.replaceChildren(...SERVING.map(([field, label, format]) =>
    tile({"data-field": field, "data-value": data(serving[field])}, label, format(serving[field] ?? null),
         field === "running" || field === "waiting" ? "requests now, all instances" : window)));
}

function counterText(name, value) {
  if (name.endsWith("_bytes")) return bytes(value);
  if (name.endsWith("_seconds")) return seconds(value);
  return number(value, Number.isInteger(value) ? 0 : 2);
}

/** Every counter the server sends (totals since it started), whatever their names. */
export function renderCounters(root, counters) {
  root.replaceChildren(...Object.entries(counters || {}).map(([name, value]) =>
    tile({"data-counter": name, "data-value": data(value), class: value ? "tile hot" : "tile"},
         words(name), counterText(name, value), "since the server started")));
}

function layerStrip(layers, numLayers) {
  const [l0, l1] = layers;
  const span = el("div", {class: "layers-held"});
  span.style.left = `${(100 * l0) / numLayers}%`;
  span.style.width = `${(100 * Math.max(l1 - l0, 0)) / numLayers}%`;
  const text = l1 > l0 ? `layers ${l0}–${l1 - 1} of ${numLayers}` : "no layers";
  return el("div", {class: "layer-row"}, [
    el("div", {class: "layers", title: `holds layers [${l0}, ${l1}) of ${numLayers}`}, [span]),
    el("span", {class: "layer-text", text}),
  ]);
}

function segment(kind, value, scale, label) {
  const part = el("div", {class: `seg ${kind}`, title: `${label}: ${bytes(value)}`});
  part.style.width = `${(100 * Math.max(value, 0)) / scale}%`;
  return part;
}

function deviceBar(dev, scale, numLayers) {
  const attrs = {
    class: dev.alive ? "device" : "device dead",
    "data-rank": data(dev.rank), "data-pid": data(dev.pid), "data-host": data(dev.host),
    "data-device": data(dev.device), "data-layers": data(dev.layers), "data-alive": data(dev.alive),
    "data-param-bytes": data(dev.param_bytes), "data-kv-used-bytes": data(dev.kv_used_bytes),
    "data-kv-total-bytes": data(dev.kv_total_bytes), "data-kv-free-bytes": data(dev.kv_free_bytes),
  };
  const kvPct = dev.kv_total_bytes ? (100 * dev.kv_used_bytes) / dev.kv_total_bytes : 0;
  return el("div", attrs, [
    el("div", {class: "device-head"}, [
      el("strong", {text: `rank ${dev.rank}`}),
      el("span", {text: ` · ${dev.device} · pid ${dev.pid}${dev.host ? ` · ${dev.host}` : ""}`}),
      el("span", {class: dev.alive ? "badge up" : "badge down", text: dev.alive ? "up" : "down"}),
    ]),
    layerStrip(dev.layers, numLayers),
    el("div", {class: "bar"}, [
      segment("param", dev.param_bytes, scale, "parameters"),
      segment("kvused", dev.kv_used_bytes, scale, "KV used"),
      segment("kvfree", dev.kv_free_bytes, scale, "KV free"),
    ]),
    el("div", {class: "device-figures"}, [
      el("span", {class: "fig-param", text: `params ${bytes(dev.param_bytes)}`}),
      el("span", {class: "fig-kvused", text: `KV used ${bytes(dev.kv_used_bytes)} (${kvPct.toFixed(0)}%)`}),
      el("span", {class: "fig-kvfree", text: `KV free ${bytes(dev.kv_free_bytes)}`}),
    ]),
  ]);
}

function instanceBox(inst, scale, numLayers) {
  const n = inst.devices.length;
  const attrs = {
    class: "instance", "data-instance": data(inst.id), "data-state": inst.state,
    "data-running": data(inst.running), "data-waiting": data(inst.waiting),
    "data-kv-used-blocks": data(inst.kv_used_blocks), "data-kv-total-blocks": data(inst.kv_total_blocks),
    "data-waiting-blocks": data(inst.waiting_blocks), "data-demand-blocks": data(inst.demand_blocks),
    "data-page-size": data(inst.page_size),
  };
  const shape = n === 1 ? "1 device" : `group of ${n} devices`;
  return el("div", attrs, [
    el("div", {class: "instance-head"}, [
      el("strong", {text: `instance ${inst.id}`}),
      el("span", {class: "state", text: inst.state}),
      el("span", {class: "muted", text: shape}),
    ]),
    el("div", {class: "instance-figures"}, [
      el("span", {class: "fig-running", text: `${inst.running} running`}),
      el("span", {class: "fig-waiting", text: `${inst.waiting} waiting`}),
      el("span", {class: "fig-blocks",
                  text: `KV ${inst.kv_used_blocks}/${inst.kv_total_blocks} blocks of ${inst.page_size} tokens`}),
      el("span", {class: "fig-demand", text: `demand ${inst.demand_blocks} blocks`}),
    ]),
    el("div", {class: "devices"}, inst.devices.map((d) => deviceBar(d, scale, numLayers))),
  ]);
}

/** One box per instance (a group of devices), in the server's order. */
export function renderCluster(root, instances) {
  const devices = instances.flatMap((i) => i.devices);
  const scale = Math.max(1, ...devices.map((d) => d.param_bytes + d.kv_total_bytes));
  const numLayers = Math.max(1, ...devices.map((d) => d.layers[1]));
  root.replaceChildren(...(instances.length ? instances.map((i) => instanceBox(i, scale, numLayers))
    : [el("p", {class: "muted", text: "no instance is reported yet"})]));
}
