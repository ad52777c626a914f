// Small helpers shared by the dashboard's modules: element builders (text only, never HTML
// from the server) and number formatting.

const SVG_NS = "http://www.w3.org/2000/svg";

function build(node, attrs, children) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null) continue;
    if (name === "class") node.setAttribute("class", value);
    else if (name === "text") node.textContent = String(value);
    else node.setAttribute(name, String(value));
  }
  for (const child of children || []) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

/** An HTML element: el("div", {class: "x", "data-v": 1, text: "..."}, [children]). */
export function el(tag, attrs, children) {
  return build(document.createElement(tag), attrs, children);
}

/** An SVG element, with the same arguments as el(). */
export function svg(tag, attrs, children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

/** A value as a data- attribute holds it: JSON, so that null, numbers and lists read back exactly. */
export function data(value) {
  return JSON.stringify(value === undefined ? null : value);
}

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = Math.abs(n);
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${n < 0 ? "-" : ""}${v.toFixed(v >= 100 || i === 0 ? 0 : 1)} ${units[i]}`;
}

export function seconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return `${(s * 1000).toFixed(s < 0.01 ? 1 : 0)} ms`;
  return `${s.toFixed(s < 10 ? 2 : 1)} s`;
}

export function number(x, digits = 0) {
  if (x === null || x === undefined) return "–";
  return Number.isInteger(x) && digits === 0 ? String(x) : x.toFixed(digits);
}

/** Unix seconds as the local time of day, HH:MM:SS. */
export function clock(t) {
  return new Date(t * 1000).toLocaleTimeString([], {hour12: false});
}

/** "swap_out_bytes" -> "swap out bytes". */
export function words(name) {
  return String(name).replace(/_/g, " ");
}

/** A CSS-safe token for a state or kind string from the server (anything else: "other"). */
export function token(name) {
  return /^[a-z0-9_-]{1,40}$/i.test(String(name)) ? String(name) : "other";
}
