// The alert page's chart: one dimension value's negative share per bucket. Its time axis spans the buckets
// that have posts (not the whole span asked for, which left 90 s of data squeezed against the right edge of a
// 15-minute axis), ticks fall on round times spaced so their labels never overlap, and what each mark means
// is in the legend under it (alerts.html). Loaded before alerts.js, which calls drawChart.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const CHART = { width: 720, height: 340, left: 44, right: 14, top: 14, bottom: 40 };
// Round steps for time ticks, in seconds; the smallest that keeps labels MIN_TICK_GAP apart is used.
const TICK_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200];
const MIN_TICK_GAP = 90;   // viewBox units between tick labels; "12:34:56" is ~50 wide at 11 px
const LABEL_HALF = 26;     // half a label's width: one this close to the right edge is right-aligned instead
// The axis never spans less than this, so one bucket of data is not stretched across the whole chart.
const MIN_SPAN_BUCKETS = 12;

function svgNode(tag, attributes, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

// [start, end] of the axis: from the first bucket with posts to the end of the newest bucket.
function chartSpan(points, bucketSeconds) {
  const first = points.find((point) => point.posts > 0);
  if (first === undefined) return null;
  const end = points[points.length - 1].start + bucketSeconds;
  const start = Math.max(points[0].start, Math.min(first.start, end - MIN_SPAN_BUCKETS * bucketSeconds));
  return [start, end];
}

function timeTicks(start, end, plotWidth) {
  const most = Math.max(2, Math.floor(plotWidth / MIN_TICK_GAP) + 1);
  const step = TICK_STEPS.find((s) => Math.floor((end - start) / s) + 1 <= most)
    ?? TICK_STEPS[TICK_STEPS.length - 1];
  const ticks = [];
  for (let t = Math.ceil(start / step) * step; t <= end; t += step) ticks.push(t);
  return { step, ticks };
}

function clockLabel(epochSeconds, withSeconds) {
  const iso = new Date(epochSeconds * 1000).toISOString();
  return withSeconds ? iso.slice(11, 19) : iso.slice(11, 16);
}

// Draws ``series`` (/alerts/api/series) into ``canvas``. ``marks``: alerts for this value ({at, rule,
// window_seconds}); ``shown``: the alert described under the chart, whose window is shaded. Returns the
// axis span in seconds (0 without data).
function drawChart(canvas, series, { threshold, bucketSeconds, marks, shown, emptyText }) {
  const { width, height, left, right, top, bottom } = CHART;
  const plotRight = width - right, plotBottom = height - bottom;
  const y = (ratio) => top + (1 - ratio) * (plotBottom - top);
  const nodes = [];
  for (const tick of [0, 0.25, 0.5, 0.75, 1]) {
    nodes.push(svgNode("line", { class: "grid", x1: left, x2: plotRight, y1: y(tick), y2: y(tick) }),
               svgNode("text", { class: "label", x: left - 6, y: y(tick) + 4, "text-anchor": "end" },
                       `${tick * 100}%`));
  }
  nodes.push(svgNode("line", { class: "threshold", x1: left, x2: plotRight, y1: y(threshold), y2: y(threshold) }));
  const span = chartSpan(series.points, bucketSeconds);
  if (span === null) {
    nodes.push(svgNode("text", { class: "empty", x: (left + plotRight) / 2, y: (top + plotBottom) / 2,
                                 "text-anchor": "middle" }, emptyText));
    canvas.replaceChildren(...nodes);
    return 0;
  }
  const [start, end] = span;
  const x = (t) => left + ((t - start) / (end - start)) * (plotRight - left);
  if (shown) {  // the shaded window of the alert described under the chart
    const from = Math.max(start, shown.window_start), to = Math.min(end, shown.window_end);
    if (to > from) {
      nodes.unshift(svgNode("rect", { class: "alert-window", x: x(from), y: top, width: x(to) - x(from),
                                      height: plotBottom - top }));
    }
  }
  const { step, ticks } = timeTicks(start, end, plotRight - left);
  for (const tick of ticks) {
    const at = x(tick);
    const anchor = at > width - LABEL_HALF ? "end" : "middle";
    nodes.push(svgNode("line", { class: "axis", x1: at, x2: at, y1: plotBottom, y2: plotBottom + 4 }),
               svgNode("text", { class: "label tick", x: anchor === "end" ? width - 2 : at, y: plotBottom + 16,
                                 "text-anchor": anchor }, clockLabel(tick, step < 60)));
  }
  nodes.push(svgNode("line", { class: "axis", x1: left, x2: plotRight, y1: plotBottom, y2: plotBottom }),
             svgNode("text", { class: "label caption", x: plotRight, y: height - 4, "text-anchor": "end" },
                     `time (UTC, ${new Date(end * 1000).toISOString().slice(0, 10)})`));
  for (const mark of marks.filter((m) => m.at >= start && m.at <= end)) {
    const line = svgNode("line", { class: "alert-mark", x1: x(mark.at), x2: x(mark.at), y1: top, y2: plotBottom });
    line.append(svgNode("title", {}, `${mark.rule} alert, ${mark.window_seconds}-second window ending ` +
                                     clockLabel(mark.at, true)));
    nodes.push(line);
  }
  let path = "";
  let previous = null;  // the last complete point drawn, where the filling bucket's dashed segment starts
  for (const point of series.points) {
    if (point.start < start) continue;
    if (point.negative_ratio === null) { path += " "; previous = null; continue; }  // no posts: a gap, not a zero
    const px = x(point.start + bucketSeconds / 2), py = y(point.negative_ratio);
    if (point.complete === false) {
      // The bucket still filling: its ratio is of the posts so far, so it is drawn as provisional.
      if (previous !== null) {
        nodes.push(svgNode("path", { class: "line partial",
          d: `M${previous[0].toFixed(1)},${previous[1].toFixed(1)}L${px.toFixed(1)},${py.toFixed(1)}` }));
      }
      nodes.push(svgNode("circle", { class: "dot partial", cx: px, cy: py, r: 3 }));
      continue;
    }
    const command = path === "" || path.endsWith(" ") ? "M" : "L";
    path += `${command}${px.toFixed(1)},${py.toFixed(1)}`;
    nodes.push(svgNode("circle", { class: "dot", cx: px, cy: py, r: 2 }));
    previous = [px, py];
  }
  if (path.trim()) nodes.push(svgNode("path", { class: "line", d: path.trim() }));
  canvas.replaceChildren(...nodes);
  return end - start;
}
