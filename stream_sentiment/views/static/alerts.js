// The alert page: a live feed (Server-Sent Events from /alerts/feed) and a chart of one dimension
// value's negative ratio per bucket (/alerts/api/series). Post texts come from the internet, so they
// are only ever set as textContent, never parsed as HTML.
"use strict";

// A token handed over in the URL's fragment (#token=..., see sign-in.js) has done its job once the page
// loads: it leaves the address bar and the history, so it is not bookmarked, shared or screenshotted.
if (new URLSearchParams(location.hash.slice(1)).has("token")) {
  history.replaceState(null, "", location.pathname + location.search);
}

const config = JSON.parse(document.body.dataset.config);
const longestWindow = Math.max(...config.windows);
const MAX_FEED_ITEMS = 200;
const SVG_NS = "http://www.w3.org/2000/svg";
const chart = { width: 720, height: 260, left: 44, right: 12, top: 12, bottom: 28 };
const alertsSeen = [];  // {dimension, value, at} of every alert shown, for the chart's markers
let selected = null;    // "dimension:value" shown in the chart
let pickedByHand = false;  // once the analyst picks a value, new alerts no longer move the chart

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function where(dimension, value) {
  return dimension === "global" ? "all posts" : `${dimension}=${value}`;
}

function windowLabel(seconds) {
  return seconds % 60 === 0 ? `${seconds / 60} min` : `${seconds} s`;
}

function utc(epochSeconds) {
  return new Date(epochSeconds * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z";
}

function showAlert(alert, fresh) {
  const item = element("li", fresh ? "alert fresh" : "alert");
  item.dataset.dimension = alert.dimension;
  item.dataset.value = alert.value;
  const head = element("div", "head");
  head.append(element("span", "rule", alert.rule), element("span", "where", where(alert.dimension, alert.value)),
              element("span", "when", `${utc(alert.at)} · window ${windowLabel(alert.window_seconds)}`));
  const z = alert.z === null ? NaN : Number(alert.z);  // null: no baseline yet
  const versus = Number.isFinite(z) ? `z ${z.toFixed(1)} vs baseline ${Number(alert.baseline_negative).toFixed(1)}`
                                    : "no baseline yet";
  const numbers = element("div", "numbers",
    `negative ${Math.round(alert.negative_ratio * 100)}% (${alert.negative}/${alert.posts} posts) · ${versus}`);
  item.append(head, numbers);
  for (const sample of (Array.isArray(alert.samples) ? alert.samples : [])) {  // all stored, as `alerts` prints
    item.append(element("div", "sample", `“${sample.text}” (P(negative) ${sample.p_negative})`));
  }
  item.addEventListener("click", () => { pickedByHand = true; select(`${alert.dimension}:${alert.value}`); });
  const feed = document.getElementById("feed");
  feed.prepend(item);
  while (feed.children.length > MAX_FEED_ITEMS) feed.lastElementChild.remove();
  document.getElementById("feed-empty").hidden = true;
  document.getElementById("feed-count").textContent = `(${feed.children.length} shown)`;
  alertsSeen.push({ key: `${alert.dimension}:${alert.value}`, at: Number(alert.at) });
}

function connectFeed() {
  const status = document.getElementById("connection");
  const source = new EventSource("/alerts/feed");
  let replaying = true;
  source.addEventListener("open", () => { status.dataset.state = "live"; status.textContent = "live"; });
  source.addEventListener("error", () => {
    if (source.readyState === EventSource.CLOSED) {
      // Refused (signed out, or too many feeds): EventSource gives up for good.
      status.dataset.state = "closed"; status.textContent = "disconnected: reload the page";
    } else {
      status.dataset.state = "reconnecting"; status.textContent = "reconnecting…";  // it retries by itself
    }
  });
  source.addEventListener("alert", (event) => {
    const alert = JSON.parse(event.data);
    showAlert(alert, !replaying);
    const key = `${alert.dimension}:${alert.value}`;
    if (selected === null || (!replaying && !pickedByHand)) select(key);  // follow the newest incident
    else if (selected === key) refreshChart();
  });
  // The backlog arrives in one burst right after connecting; alerts after that are flashed as new.
  setTimeout(() => { replaying = false; }, 1500);
}

function select(key) {
  selected = key;
  const menu = document.getElementById("dimension");
  if (![...menu.options].some((option) => option.value === key)) {
    const [dimension, value] = splitKey(key);
    menu.append(new Option(where(dimension, value), key));
  }
  menu.value = key;
  refreshChart();
}

function splitKey(key) {
  const colon = key.indexOf(":");
  return [key.slice(0, colon), key.slice(colon + 1)];
}

async function refreshValues() {
  const response = await fetch(`/alerts/api/values?seconds=${longestWindow}`, { credentials: "same-origin" });
  if (!response.ok) return;
  const { values } = await response.json();
  const menu = document.getElementById("dimension");
  const keys = values.map((row) => `${row.dimension}:${row.value}`);
  if (selected !== null && !keys.includes(selected)) keys.push(selected);
  const labels = new Map(values.map((row) => [`${row.dimension}:${row.value}`,
    `${where(row.dimension, row.value)} (${Math.round(row.negative_ratio * 100)}% of ${row.posts})`]));
  menu.replaceChildren(...keys.map((key) => new Option(labels.get(key) ?? where(...splitKey(key)), key)));
  if (selected === null && keys.length) selected = keys.includes("global:all") ? "global:all" : keys[0];
  if (selected !== null) menu.value = selected;
}

function svg(tag, attributes, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

async function refreshChart() {
  if (selected === null) return;
  const [dimensionName, value] = splitKey(selected);
  const query = new URLSearchParams({ dimension: dimensionName, value, seconds: String(longestWindow) });
  const response = await fetch(`/alerts/api/series?${query}`, { credentials: "same-origin" });
  if (!response.ok) return;
  drawChart(await response.json());
}

function drawChart(series) {
  const canvas = document.getElementById("chart");
  const { width, height, left, right, top, bottom } = chart;
  const points = series.points;
  const first = points.length ? points[0].start : 0;
  const last = points.length ? points[points.length - 1].start : 1;
  const x = (start) => left + ((start - first) / Math.max(1, last - first)) * (width - left - right);
  const y = (ratio) => top + (1 - ratio) * (height - top - bottom);
  const nodes = [];
  for (const tick of [0, 0.25, 0.5, 0.75, 1]) {
    nodes.push(svg("line", { class: "axis", x1: left, x2: width - right, y1: y(tick), y2: y(tick) }),
               svg("text", { class: "label", x: 4, y: y(tick) + 4 }, `${tick * 100}%`));
  }
  nodes.push(svg("line", { class: "threshold", x1: left, x2: width - right,
                           y1: y(config.ratio_threshold), y2: y(config.ratio_threshold) }));
  for (const alert of alertsSeen.filter((a) => a.key === selected && a.at >= first)) {
    const at = Math.min(alert.at, last);
    nodes.push(svg("line", { class: "alert-mark", x1: x(at), x2: x(at), y1: top, y2: height - bottom }));
  }
  let path = "";
  let previous = null;  // the last complete point drawn, where the filling bucket's dashed segment starts
  for (const point of points) {
    if (point.negative_ratio === null) { path += " "; previous = null; continue; }  // no posts: a gap, not a zero
    const px = x(point.start), py = y(point.negative_ratio);
    if (point.complete === false) {
      // The bucket still filling: its ratio is of the posts so far, so it is drawn as provisional.
      if (previous !== null) {
        nodes.push(svg("path", { class: "line partial", d: `M${previous[0].toFixed(1)},${previous[1].toFixed(1)}L${px.toFixed(1)},${py.toFixed(1)}` }));
      }
      nodes.push(svg("circle", { class: "dot partial", cx: px, cy: py, r: 3 }));
      continue;
    }
    const command = path === "" || path.endsWith(" ") ? "M" : "L";
    path += `${command}${px.toFixed(1)},${py.toFixed(1)}`;
    nodes.push(svg("circle", { class: "dot", cx: px, cy: py, r: 2 }));
    previous = [px, py];
  }
  nodes.push(svg("path", { class: "line", d: path.trim() || "M0,0" }));
  if (points.length) {
    nodes.push(svg("text", { class: "label", x: left, y: height - 8 }, utc(first).slice(11)),
               svg("text", { class: "label", x: width - right - 60, y: height - 8 }, utc(last).slice(11)));
  }
  canvas.replaceChildren(...nodes);
  const posts = points.reduce((sum, point) => sum + point.posts, 0);
  document.getElementById("chart-note").textContent =
    `${where(series.dimension, series.value)}: ${posts} posts in the last ${windowLabel(longestWindow)}, ` +
    `${config.bucket_seconds}-second buckets (the hollow dot: the bucket still filling); ` +
    `dashed line: the ${Math.round(config.ratio_threshold * 100)}% alert ratio`;
}

document.getElementById("dimension").addEventListener("change", (event) => {
  selected = event.target.value;
  pickedByHand = true;
  refreshChart();
});

connectFeed();
refreshValues().then(refreshChart);
setInterval(() => { refreshValues().then(refreshChart); }, Math.max(2, config.bucket_seconds) * 1000);
