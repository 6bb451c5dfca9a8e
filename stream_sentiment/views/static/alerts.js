// The alert page: a live feed (Server-Sent Events from /alerts/feed) and a chart of one dimension value's
// negative share per bucket (/alerts/api/series, drawn by chart.js) with the alert it follows described
// under it. Post texts come from the internet, so they are only ever set as textContent, never parsed as HTML.
"use strict";

// A token handed over in the URL's fragment (#token=..., see sign-in.js) has done its job once the page
// loads: it leaves the address bar and the history, so it is not bookmarked, shared or screenshotted.
if (new URLSearchParams(location.hash.slice(1)).has("token")) {
  history.replaceState(null, "", location.pathname + location.search);
}

const config = JSON.parse(document.body.dataset.config);
const longestWindow = Math.max(...config.windows);
const MAX_FEED_ITEMS = 200;
const latestFor = new Map();  // "dimension:value" -> the newest alert seen for it
const marksFor = new Map();   // "dimension:value" -> [{at, rule, window_seconds}] of every alert seen, for the chart
let newestKey = null;         // the value of the newest alert seen
let selected = null;          // "dimension:value" shown in the chart
let following = true;         // the chart moves to each newest alert until the analyst picks a value
let lastSeries = null;        // the chart's data, redrawn when an alert mark arrives

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function keyOf(alert) { return `${alert.dimension}:${alert.value}`; }

function splitKey(key) {
  const colon = key.indexOf(":");
  return [key.slice(0, colon), key.slice(colon + 1)];
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

// One alert as the feed and the panel under the chart show it: rule, value, window, numbers, every sample.
function alertBody(alert, container) {
  const head = element("div", "head");
  head.append(element("span", "rule", alert.rule), element("span", "where", where(alert.dimension, alert.value)),
              element("span", "when", `${utc(alert.at)} · window ${windowLabel(alert.window_seconds)}`));
  const z = alert.z === null ? NaN : Number(alert.z);  // null: no baseline yet
  const versus = Number.isFinite(z) ? `z ${z.toFixed(1)} vs baseline ${Number(alert.baseline_negative).toFixed(1)}`
                                    : "no baseline yet";
  container.append(head, element("div", "numbers",
    `negative ${Math.round(alert.negative_ratio * 100)}% (${alert.negative}/${alert.posts} posts) · ${versus} · ` +
    engines(alert)));
  for (const sample of (Array.isArray(alert.samples) ? alert.samples : [])) {  // all stored, as `alerts` prints
    const quote = element("div", "sample", `“${sample.text}” (P(negative) ${sample.p_negative})`);
    // The post's language: the browser picks a font and glyph forms for it (Chinese on an English page).
    if (typeof sample.lang === "string" && /^[a-z]{2,3}$/.test(sample.lang)) quote.lang = sample.lang;
    container.append(quote);
  }
}

// The engines that scored the window's posts (several with language routing), as `alerts` names them.
function engines(alert) {
  const counts = alert.engines && typeof alert.engines === "object" ? Object.entries(alert.engines) : [];
  if (counts.length > 1) return "engines " + counts.map(([name, posts]) => `${name} (${posts})`).join(", ");
  return `engine ${alert.engine_version}`;
}

function showAlert(alert, fresh) {
  const item = element("li", fresh ? "alert fresh" : "alert");
  item.dataset.dimension = alert.dimension;
  item.dataset.value = alert.value;
  alertBody(alert, item);
  item.addEventListener("click", () => setFollowing(false, keyOf(alert)));
  const feed = document.getElementById("feed");
  feed.prepend(item);
  while (feed.children.length > MAX_FEED_ITEMS) feed.lastElementChild.remove();
  document.getElementById("feed-empty").hidden = true;
  document.getElementById("feed-count").textContent = `(${feed.children.length} shown, newest first)`;
  const key = keyOf(alert);
  latestFor.set(key, alert);
  if (!marksFor.has(key)) marksFor.set(key, []);
  marksFor.get(key).push({ at: Number(alert.at), rule: alert.rule, window_seconds: alert.window_seconds });
  newestKey = key;
}

function connectFeed() {
  const status = document.getElementById("connection");
  const source = new EventSource("/alerts/feed");
  // The backlog comes oldest first, then the server says "caught-up": only then is the newest known, and
  // only later alerts are flashed as new. (Selecting as they came opened the page on the oldest alert.)
  let replaying = true;
  source.addEventListener("open", () => { status.dataset.state = "live"; status.textContent = "live"; });
  source.addEventListener("error", () => {
    if (source.readyState === EventSource.CLOSED) {
      // Refused (signed out, or too many feeds): EventSource gives up for good.
      status.dataset.state = "closed"; status.textContent = "disconnected: reload the page";
      return;
    }
    // It retries by itself (the feed advises 2 s): only a reconnection that is not back by then is shown,
    // so a blip (or a headless browser ending its page load) does not read as an outage.
    setTimeout(() => {
      if (source.readyState !== EventSource.OPEN) {
        status.dataset.state = "reconnecting"; status.textContent = "reconnecting…";
      }
    }, 2500);
  });
  source.addEventListener("alert", (event) => {
    const alert = JSON.parse(event.data);
    showAlert(alert, !replaying);
    if (replaying) return;
    if (following) select(keyOf(alert));
    else if (selected === keyOf(alert)) refreshChart();
  });
  source.addEventListener("caught-up", () => {
    replaying = false;
    if (following && newestKey !== null) select(newestKey);
  });
}

function setFollowing(on, key) {
  following = on;
  document.getElementById("follow").checked = on;
  const target = on ? newestKey : key;
  if (target !== null && target !== undefined) select(target);
}

function select(key) {
  selected = key;
  const menu = document.getElementById("dimension");
  if (![...menu.options].some((option) => option.value === key)) {
    menu.append(new Option(where(...splitKey(key)), key));
  }
  menu.value = key;
  showDetail();
  refreshChart();
}

// The panel under the chart: the newest alert for the value shown, with every sample post it stored.
function showDetail() {
  const alert = selected === null ? undefined : latestFor.get(selected);
  const body = document.getElementById("detail-body");
  body.replaceChildren();
  document.getElementById("detail-title").textContent = following ? "Newest alert" : "Newest alert for this value";
  if (alert === undefined) {
    body.append(element("p", "note", selected === null ? "No alerts yet."
      : `No alert for ${where(...splitKey(selected))} in the feed: the chart shows its share only.`));
    return;
  }
  alertBody(alert, body);
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
  // Until an alert arrives, the chart shows all posts.
  if (selected === null && keys.length) {
    selected = keys.includes("global:all") ? "global:all" : keys[0];
    showDetail();
  }
  if (selected !== null) menu.value = selected;
}

async function refreshChart() {
  if (selected === null) return;
  const [dimension, value] = splitKey(selected);
  const query = new URLSearchParams({ dimension, value, seconds: String(longestWindow) });
  const response = await fetch(`/alerts/api/series?${query}`, { credentials: "same-origin" });
  if (!response.ok) return;
  const series = await response.json();
  if (`${series.dimension}:${series.value}` !== selected) return;  // an answer for a value no longer shown
  lastSeries = series;
  redraw();
}

function redraw() {
  if (lastSeries === null) return;
  const key = `${lastSeries.dimension}:${lastSeries.value}`;
  const shown = latestFor.get(key);
  const spanned = drawChart(document.getElementById("chart"), lastSeries, {
    threshold: config.ratio_threshold, bucketSeconds: config.bucket_seconds, marks: marksFor.get(key) ?? [],
    shown: shown && { window_start: Number(shown.window_start), window_end: Number(shown.window_end) },
    emptyText: `no posts for ${where(lastSeries.dimension, lastSeries.value)} in the last ${windowLabel(longestWindow)}`,
  });
  const posts = lastSeries.points.reduce((sum, point) => sum + point.posts, 0);
  document.getElementById("chart-title").textContent =
    `Negative share of ${where(lastSeries.dimension, lastSeries.value)}`;
  document.getElementById("chart-note").textContent = spanned
    ? `${posts} posts over the ${windowLabel(spanned)} shown (the axis starts at the first bucket with posts, ` +
      `at most ${windowLabel(longestWindow)} back)`
    : "";
}

document.getElementById("threshold-label").textContent = `${Math.round(config.ratio_threshold * 100)}%`;
document.getElementById("bucket-label").textContent = `${config.bucket_seconds}-second`;
document.getElementById("dimension").addEventListener("change", (event) => setFollowing(false, event.target.value));
document.getElementById("follow").addEventListener("change", (event) => setFollowing(event.target.checked));

connectFeed();
refreshValues().then(refreshChart);
setInterval(() => { refreshValues().then(refreshChart); }, Math.max(2, config.bucket_seconds) * 1000);
