// The board's charts: throughput and lead time per lane over time (GET /v1/flow), cost per delivered task
// by family (GET /v1/spend?group=family). Plain JS and hand-drawn SVG, no build step and no library
// (ADR 0007); colours and sizes come from board.css classes (the page's CSP allows no inline style).

const SVG_NS = "http://www.w3.org/2000/svg";
const W = 340, H = 150, PAD = { l: 38, r: 10, t: 10, b: 24 };
const SERIES = 8;  // board.css defines .series-0 … .series-7

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, String(v));
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function span(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 10) return `${seconds.toFixed(1)}s`;
  if (seconds < 90) return `${Math.round(seconds)}s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)}m`;
  if (seconds < 172800) return `${(seconds / 3600).toFixed(1)}h`;
  return `${(seconds / 86400).toFixed(1)}d`;
}

function when(ms, bucket) {
  const d = new Date(ms);
  return bucket === "day" ? d.toISOString().slice(5, 10) : d.toISOString().slice(11, 16);
}

// A line chart: one series per lane, a dot per bucket that has a value (a <title> on each dot).
function lineChart(title, series, value, fmt, bucket, since) {
  const pts = [];
  for (const s of series) for (const p of s.points) if (value(p) !== null) pts.push(p);
  const box = el("figure", { class: "chart", "data-chart": title });
  box.append(el("figcaption", { text: title }));
  if (!pts.length) {
    box.append(el("p", { class: "muted chart-empty", text: "nothing finished in this window" }));
    return box;
  }
  const t0 = since.getTime(), t1 = Date.now();
  const ymax = Math.max(...pts.map(value)) || 1;
  const x = (t) => PAD.l + (W - PAD.l - PAD.r) * Math.min(1, Math.max(0, (t - t0) / Math.max(1, t1 - t0)));
  const y = (v) => H - PAD.b - (H - PAD.t - PAD.b) * (v / ymax);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart-svg", role: "img", "aria-label": title });
  root.append(svg("line", { x1: PAD.l, y1: H - PAD.b, x2: W - PAD.r, y2: H - PAD.b, class: "axis" }));
  root.append(svg("line", { x1: PAD.l, y1: PAD.t, x2: PAD.l, y2: H - PAD.b, class: "axis" }));
  root.append(svg("text", { x: PAD.l - 4, y: PAD.t + 8, class: "tick", "text-anchor": "end" }, fmt(ymax)));
  root.append(svg("text", { x: PAD.l - 4, y: H - PAD.b, class: "tick", "text-anchor": "end" }, fmt(0)));
  root.append(svg("text", { x: PAD.l, y: H - 6, class: "tick" }, when(t0, bucket)));
  root.append(svg("text", { x: W - PAD.r, y: H - 6, class: "tick", "text-anchor": "end" }, when(t1, bucket)));
  series.forEach((s, i) => {
    const cls = `series-${i % SERIES}`;
    const mine = s.points.filter((p) => value(p) !== null);
    if (mine.length > 1) {
      const d = mine.map((p) => `${x(p.t).toFixed(1)},${y(value(p)).toFixed(1)}`).join(" ");
      root.append(svg("polyline", { points: d, class: `line ${cls}` }));
    }
    for (const p of mine) {
      root.append(svg("circle", { cx: x(p.t).toFixed(1), cy: y(value(p)).toFixed(1), r: 3, class: `pt ${cls}`,
                                  "data-lane": s.lane, "data-value": value(p) },
                      svg("title", {}, `${s.lane} · ${when(p.t, bucket)}: ${fmt(value(p))}`)));
    }
  });
  box.append(root);
  box.append(legend(series.map((s) => s.lane)));
  return box;
}

function legend(names) {
  const ul = el("ul", { class: "legend" });
  names.forEach((n, i) => {
    const sw = svg("svg", { viewBox: "0 0 10 10", class: "swatch" },
                   svg("rect", { width: 10, height: 10, class: `series-${i % SERIES}` }));
    ul.append(el("li", {}, sw, n));
  });
  return ul;
}

// Horizontal bars: cost per delivered task by family (one bar per family and currency); a family that
// delivered without reporting any cost is drawn as "unknown", never as a zero bar.
function barChart(title, rows) {
  const box = el("figure", { class: "chart", "data-chart": title });
  box.append(el("figcaption", { text: title }));
  if (!rows.length) {
    box.append(el("p", { class: "muted chart-empty", text: "no deliveries yet" }));
    return box;
  }
  const known = rows.filter((r) => r.value !== null);
  const vmax = Math.max(0, ...known.map((r) => r.value)) || 1;
  const ROW = 20, LABEL = 130;
  const h = rows.length * ROW + 6;
  const root = svg("svg", { viewBox: `0 0 ${W} ${h}`, class: "chart-svg bars", role: "img", "aria-label": title });
  rows.forEach((r, i) => {
    const y = 3 + i * ROW;
    root.append(svg("text", { x: LABEL - 6, y: y + 13, class: "tick", "text-anchor": "end" }, r.label));
    if (r.value === null) {
      root.append(svg("rect", { x: LABEL, y: y + 3, width: 60, height: ROW - 8, class: "bar unknown" }));
      root.append(svg("text", { x: LABEL + 66, y: y + 13, class: "tick" }, "unknown"));
      return;
    }
    const w = Math.max(1, (W - LABEL - 70) * (r.value / vmax));
    root.append(svg("rect", { x: LABEL, y: y + 3, width: w.toFixed(1), height: ROW - 8,
                              class: `bar series-${i % SERIES}`, "data-family": r.family, "data-value": r.value },
                    svg("title", {}, `${r.family}: ${r.text} per delivered task (${r.deliveries} delivered)`)));
    root.append(svg("text", { x: LABEL + w + 6, y: y + 13, class: "tick" }, r.text));
  });
  box.append(root);
  return box;
}

function series(items, lanes) {
  const by = new Map();
  for (const it of items) {
    if (lanes && lanes.size && !lanes.has(it.lane)) continue;
    if (!by.has(it.lane)) by.set(it.lane, { lane: it.lane, points: [] });
    by.get(it.lane).points.push({ t: Date.parse(it.bucket), finished: it.finished,
                                  lead: it.lead_time_avg_seconds });
  }
  return [...by.values()];
}

function costRows(items) {
  const rows = [];
  for (const r of items) {
    if (!r.family || !r.deliveries) continue;
    if (r.currency === null && items.some((o) => o.family === r.family && o.currency !== null)) continue;
    const value = r.cost_per_delivery === null ? null : Number(r.cost_per_delivery);
    rows.push({ family: r.family, label: r.currency ? `${r.family} · ${r.currency}` : r.family, value,
                text: value === null ? "unknown" : `${r.cost_per_delivery} ${r.currency}`,
                deliveries: r.deliveries });
  }
  return rows;
}

let bucket = "hour";

// Draws the charts into `root` with the board's `api` (its token); `lanes`: the lanes on the board.
export async function refreshCharts(api, root, lanes) {
  if (!root) return;
  const [flow, spend] = await Promise.all([api("GET", `/v1/flow?bucket=${bucket}`),
                                           api("GET", "/v1/spend?group=family")]);
  const s = series(flow.items, lanes);
  const since = new Date(flow.since);
  const toggle = el("button", { type: "button", class: "chart-bucket",
                                text: bucket === "hour" ? "daily, 30 days" : "hourly, 48 hours" });
  toggle.addEventListener("click", () => {
    bucket = bucket === "hour" ? "day" : "hour";
    refreshCharts(api, root, lanes).catch((e) => console.warn("charts:", e && e.message));
  });
  root.replaceChildren(
    el("p", { class: "muted panel-note" }, bucket === "hour" ? "Hourly, last 48 hours. " : "Daily, last 30 days. ",
       toggle),
    lineChart("Throughput (tasks finished)", s, (p) => p.finished, (v) => String(Math.round(v)), bucket, since),
    lineChart("Lead time (created → finished)", s, (p) => p.lead, span, bucket, since),
    barChart("Cost per delivered task, by family", costRows(spend.items)),
  );
}
