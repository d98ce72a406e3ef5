// The AINARRES board: plain JS, no build step (ADR 0007). It reads the JSON API with the token kept in
// this tab's sessionStorage (sent as Authorization: Bearer, never in a URL) and follows the event
// stream through fetch() streaming, since EventSource cannot send headers.

import { mountGovernance, refreshGovernance } from "./governance.js";
import { refreshCharts } from "./charts.js";

const TOKEN_KEY = "ainarres.token";
const PANEL_REFRESH_MS = 10000;   // stuck work depends on time passing, not only on events
const PANEL_DEBOUNCE_MS = 700;
const RETRY_MS = 2000;
const FEED_SIZE = 40;

const $ = (sel, root = document) => root.querySelector(sel);

const S = {
  token: sessionStorage.getItem(TOKEN_KEY),
  me: null,
  project: null,
  projects: [],
  lanes: new Map(),        // lane key -> {key, workflow}
  tasks: new Map(),        // task id -> board row (merged with stream updates)
  stuck: new Map(),        // task id -> stuck row
  escalated: new Set(),    // task ids with an escalated event
  lastEventId: 0,
  openTask: null,
  asking: null,
  refocus: null,           // the aria-label of the family button to focus after the next render            // the family whose "Disable …?" confirmation is open
  returnFocus: null,
  stream: null,            // AbortController of the live stream
  timers: [],
  panelTimer: null,
  drawerTimer: null,
};

// ---------------------------------------------------------------- helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

const SVG_NS = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function short(id) { return String(id || "").slice(0, 8); }

// Minted subs read "<family>.<hex>": beside the family, the hex alone names the agent.
function agentName(sub, family) {
  const s = String(sub || "");
  if (family && s.startsWith(`${family}.`)) return s.slice(family.length + 1);
  return s.length > 18 ? `…${s.slice(-12)}` : s;
}

function ago(iso) {
  if (!iso) return "";
  return duration((Date.now() - Date.parse(iso)) / 1000);
}

function duration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h${String(Math.floor(s % 3600 / 60)).padStart(2, "0")}m`;
  return `${Math.floor(s / 86400)}d`;
}

function clock(iso) {
  const d = new Date(iso);
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function oversees() {
  return S.me && S.me.features.some((f) => f === "seat:overseer" || f === "seat:admin");
}

class ApiError extends Error {
  constructor(status, body) {
    super((body && (body.detail || body.title)) || `HTTP ${status}`);
    this.status = status;
    this.code = body && body.code;
  }
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${S.token}`, Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body),
                                   cache: "no-store", credentials: "omit" });
  const text = await resp.text();
  const data = text ? JSON.parse(text) : null;
  if (!resp.ok) {
    if (resp.status === 401) signOut(data && data.detail);
    throw new ApiError(resp.status, data);
  }
  return data;
}

async function all(path, params = {}) {
  const items = [];
  let cursor = null;
  for (let i = 0; i < 50; i++) {
    const q = new URLSearchParams({ ...params, limit: "500" });
    if (cursor) q.set("cursor", cursor);
    const page = await api("GET", `${path}?${q}`);
    items.push(...page.items);
    if (!page.next) break;
    cursor = page.next;
  }
  return items;
}

// A task's events page by `after` (the last id seen), not by an opaque cursor.
async function taskEvents(id) {
  const items = [];
  let after = 0;
  for (let i = 0; i < 20; i++) {
    const page = await api("GET", `/v1/tasks/${id}/events?after=${after}&limit=1000`);
    items.push(...page.items);
    if (page.next === null || page.next === undefined || !page.items.length) break;
    after = page.next;
  }
  return items;
}

function projectParams() { return S.project ? { project: S.project } : {}; }

function toast(message, kind = "info") {
  const t = el("div", { class: `toast ${kind}`, role: kind === "error" ? "alert" : "status", text: message });
  document.body.append(t);
  setTimeout(() => t.remove(), 5000);
}

// ---------------------------------------------------------------- sign in / out

function showSignIn(message) {
  $("#board-view").hidden = true;
  $("#signin-view").hidden = false;
  $("#signout").hidden = true;
  $("#whoami").textContent = "";
  $("#signin-error").textContent = message || "";
  $("#token").value = "";
  $("#token").focus();
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  S.token = null;
  stop();
  showSignIn(message);
}

function stop() {
  if (S.stream) S.stream.abort();
  S.stream = null;
  S.timers.forEach(clearInterval);
  S.timers = [];
  if (S.token) setLive("idle", "connecting…"); else setLive("idle", "not signed in");
}

$("#signin").addEventListener("submit", async (e) => {
  e.preventDefault();
  const token = $("#token").value.trim();
  if (!token) return;
  S.token = token;
  try {
    const me = await api("GET", "/v1/me");
    if (!me.features.some((f) => f.startsWith("seat:"))) {
      throw new Error("this token has no seat: the board needs seat:overseer, seat:monitor or seat:admin");
    }
  } catch (err) {
    S.token = null;
    $("#signin-error").textContent = err.message;
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $("#token").value = "";
  start();
});

$("#signout").addEventListener("click", () => signOut("signed out"));

// ---------------------------------------------------------------- start

async function start() {
  stop();
  $("#signin-view").hidden = true;
  try {
    S.me = await api("GET", "/v1/me");
    const parts = location.pathname.split("/").filter(Boolean);
    S.project = parts.length > 1 ? decodeURIComponent(parts[1]) : null;
    const all_ = await api("GET", "/v1/layout");
    S.projects = all_.projects;
    if (!S.project && S.projects.length) {
      S.project = S.projects[0].slug;
      history.replaceState(null, "", `/board/${encodeURIComponent(S.project)}`);
    }
    renderProjects();
    const proj = S.projects.find((p) => p.slug === S.project);
    if (!proj && S.project) throw new Error(`no project ${S.project}`);
    S.lanes = new Map((proj ? proj.lanes : []).map((l) => [l.key, l]));
    // Everything after this id arrives through the stream, so nothing falls between load and live.
    const newest = await api("GET", "/v1/feed?limit=1");
    S.lastEventId = newest.items.length ? newest.items[0].id : 0;
    await loadBoard();
    mountGovernance({ api, all, el, toast, params: projectParams, me: () => S.me, refresh: refreshPanels,
                      seated: () => S.me.features.includes("seat:overseer"), openTask: taskLink });
    startStream();
    refreshPanels();
    loadFeed();
    S.timers.push(setInterval(tick, 1000));
    S.timers.push(setInterval(() => { refreshPanels(); loadBoard(); }, PANEL_REFRESH_MS));
  } catch (err) {
    if (!S.token) return;
    $("#board-view").hidden = false;
    $("#lanes").replaceChildren(el("p", { class: "error", role: "alert", text: `Could not load the board: ${err.message}` }));
    return;
  }
  $("#whoami").textContent = `${S.me.family} · ${S.me.features.filter((f) => f.startsWith("seat:")).join(" ")}`;
  $("#signout").hidden = false;
  $("#board-view").hidden = false;
}

function renderProjects() {
  $("#project-name").textContent = S.project ? `· ${S.project}` : "";
  document.title = S.project ? `${S.project} · AINARRES board` : "AINARRES board";
  const nav = $("#projects");
  nav.replaceChildren(...S.projects.map((p) =>
    el("a", { href: `/board/${encodeURIComponent(p.slug)}`, "aria-current": p.slug === S.project ? "page" : null,
              text: p.slug })));
}

// ---------------------------------------------------------------- the board

async function loadBoard() {
  const rows = await all("/v1/board", projectParams());
  const esc = await all("/v1/feed", { ...projectParams(), type: "escalated" });
  esc.forEach((e) => S.escalated.add(e.task_id));
  const seen = new Set();
  if (!$("#lanes").children.length || $("#lanes .lane") === null) renderLanes();
  for (const row of rows) {
    seen.add(row.id);
    const prev = S.tasks.get(row.id);
    // A board read older than a stream update must not move a card back.
    if (prev && Date.parse(prev.updated_at) > Date.parse(row.updated_at)) continue;
    S.tasks.set(row.id, row);
    placeCard(row);
  }
  for (const id of [...S.tasks.keys()]) {
    if (!seen.has(id)) { S.tasks.delete(id); document.getElementById(`card-${id}`)?.closest("li")?.remove(); }
  }
  updateCounts();
}

function renderLanes() {
  const root = $("#lanes");
  if (!S.lanes.size) {
    root.replaceChildren(el("p", { class: "muted", text: "No lanes in this project yet." }));
    return;
  }
  root.replaceChildren(...[...S.lanes.values()].map(renderLane));
}

function renderLane(lane) {
  const wf = lane.workflow;
  const columns = wf.stages.map((st) =>
    el("section", { class: `column${st.terminal ? " terminal" : ""}`, "data-stage": st.key,
                    "aria-label": `stage ${st.key}` },
       el("h3", {}, st.key, " ", el("span", { class: "count", text: "0" })),
       el("ul", { class: "cards", role: "list" })));
  return el("section", { class: "lane", id: `lane-${lane.key}`, "data-lane": lane.key, "aria-labelledby": `lane-h-${lane.key}` },
    el("header", {},
      el("h2", { id: `lane-h-${lane.key}` }, `lane ${lane.key}`),
      el("span", { class: "muted", text: `workflow ${wf.key} v${wf.version}` })),
    el("div", { class: "columns" }, columns),
    el("details", { class: "workflow" }, el("summary", { text: "Workflow drawing" }), drawWorkflow(wf)));
}

function column(task) {
  const lane = document.querySelector(`.lane[data-lane="${CSS.escape(task.lane)}"]`);
  return lane && lane.querySelector(`.column[data-stage="${CSS.escape(task.stage)}"] ul`);
}

function abandoned(t) {
  return t.state === "held" && t.lease_expires_at && Date.parse(t.lease_expires_at) <= Date.now();
}

function badges(t) {
  const out = [];
  if (t.state === "blocked") out.push(["blocked", "blocked", t.blocked_reason || "blocked for a human"]);
  if (abandoned(t)) out.push(["abandoned", "abandoned", "lease ran out; the next eligible claim takes it back"]);
  const st = S.stuck.get(t.id);
  if (st && t.state === "held") out.push(["stuck", st.kind === "treadmill" ? "treadmill" : "stuck",
                                          `${st.kind}: silent for ${duration(st.silent_for_seconds)}`]);
  const tier = (t.required_features || []).find((f) => /^tier:\d+$/.test(f));
  if (S.escalated.has(t.id)) {
    out.push(["escalated", tier ? `escalated → ${tier}` : "escalated", "failed attempts moved it to a more capable tier"]);
  } else if (tier) {
    out.push(["tier", tier, "needs an agent of this tier"]);
  }
  if (t.state === "waiting") {
    const n = (t.unmet_dependencies || t.depends_on || []).length;
    out.push(["waiting", `waits on ${n}`, "dependencies not done yet"]);
  }
  return out;
}

function renderCard(t) {
  const held = t.state === "held";
  const b = badges(t);
  const label = `${t.title}; ${t.state}${b.length ? "; " + b.map((x) => x[1]).join(", ") : ""}`;
  const card = el("article", {
    class: `card state-${t.state}${b.some((x) => x[0] === "blocked") ? " is-blocked" : ""}`,
    id: `card-${t.id}`, tabindex: "0", role: "button", "aria-haspopup": "dialog", "aria-label": label,
    dataset: { taskId: t.id, state: t.state, stage: t.stage },
    onclick: () => openDrawer(t.id, card),
    onkeydown: (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); openDrawer(t.id, card); } },
  },
    el("div", { class: "title", text: t.title }),
    b.length ? el("div", { class: "badges" }, b.map(([k, text, title]) => el("span", { class: `badge ${k}`, title, text }))) : null,
    el("div", { class: "meta" },
       el("span", { text: short(t.id) }),
       t.priority ? el("span", { text: `p${t.priority}` }) : null,
       t.attempts ? el("span", { text: `attempts ${t.attempts}` }) : null,
       t.rework_count ? el("span", { text: `rework ${t.rework_count}` }) : null),
    held ? el("div", { class: "holder" },
       el("span", { class: "who", text: `${t.holder_family || "agent"} ${agentName(t.holder, t.holder_family)}` }),
       el("span", { class: "lease", "data-expires": t.lease_expires_at, text: leaseText(t.lease_expires_at) })) : null);
  return card;
}

function leaseText(iso) {
  if (!iso) return "";
  const left = (Date.parse(iso) - Date.now()) / 1000;
  return left > 0 ? `lease ${duration(left)}` : "lease expired";
}

function placeCard(t) {
  const old = document.getElementById(`card-${t.id}`);
  const hadFocus = old && document.activeElement === old;
  const target = column(t);
  if (!target) { if (old) old.closest("li").remove(); return; }
  const card = renderCard(t);
  const li = old ? old.closest("li") : el("li");
  li.replaceChildren(card);
  // Order inside a column: blocked and held first, then by priority, then oldest.
  const rank = (x) => (x.state === "blocked" ? 0 : x.state === "held" ? 1 : x.state === "ready" ? 2 : 3);
  const key = (x) => [rank(x), -(x.priority || 0), Date.parse(x.created_at)];
  const mine = key(t);
  let before = null;
  for (const other of target.children) {
    if (other === li) continue;
    const ot = S.tasks.get(other.firstChild && other.firstChild.dataset.taskId);
    if (!ot) continue;
    const k = key(ot);
    if (k[0] > mine[0] || (k[0] === mine[0] && (k[1] > mine[1] || (k[1] === mine[1] && k[2] > mine[2])))) {
      before = other;
      break;
    }
  }
  if (li.parentElement !== target || li.nextElementSibling !== before) target.insertBefore(li, before);
  if (hadFocus) card.focus();
}

function updateCounts() {
  for (const col of document.querySelectorAll(".column")) {
    col.querySelector("h3 .count").textContent = String(col.querySelectorAll(".card").length);
  }
}

function tick() {
  for (const span of document.querySelectorAll(".lease[data-expires]")) {
    span.textContent = leaseText(span.dataset.expires);
  }
  for (const t of S.tasks.values()) {
    if (t.state !== "held") continue;
    const card = document.getElementById(`card-${t.id}`);
    const shown = card && card.querySelector(".badge.abandoned") !== null;
    if (card && shown !== Boolean(abandoned(t))) placeCard(t);
  }
}

// ---------------------------------------------------------------- the live stream

// "on": streaming; "off": lost the stream, retrying; "idle": not signed in or not started (neutral).
function setLive(state, text) {
  const live = $("#live");
  live.className = `live ${state}`;
  live.textContent = text;
}

function startStream() {
  const ctl = new AbortController();
  S.stream = ctl;
  (async () => {
    while (!ctl.signal.aborted) {
      try {
        const q = new URLSearchParams({ ...projectParams(), keepalive: "15" });
        const resp = await fetch(`/v1/events/stream?${q}`, {
          headers: { Authorization: `Bearer ${S.token}`, Accept: "text/event-stream",
                     "Last-Event-ID": String(S.lastEventId) },
          signal: ctl.signal, cache: "no-store", credentials: "omit",
        });
        if (resp.status === 401) { signOut("your token is no longer valid"); return; }
        if (!resp.ok || !resp.body) throw new Error(`stream: HTTP ${resp.status}`);
        setLive("on", "live");
        await readFrames(resp.body, ctl);
      } catch (err) {
        if (ctl.signal.aborted) return;
      }
      setLive("off", "reconnecting…");
      await new Promise((r) => setTimeout(r, RETRY_MS));
    }
  })();
}

async function readFrames(body, ctl) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  while (true) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const frame = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = [];
      let kind = "message";
      for (const line of frame.split("\n")) {
        if (line.startsWith(":")) continue;
        const i = line.indexOf(":");
        const field = i < 0 ? line : line.slice(0, i);
        const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
        if (field === "data") data.push(val);
        else if (field === "event") kind = val;
      }
      if (!data.length) continue;
      const payload = JSON.parse(data.join("\n"));
      if (kind === "error") { ctl.abort(); signOut(payload.detail); return; }
      onEvent(payload);
    }
  }
}

function onEvent(ev) {
  if (ev.id > S.lastEventId) S.lastEventId = ev.id;
  if (ev.type === "escalated") S.escalated.add(ev.task_id);
  if (ev.task) applyTask(ev.task, ev);
  pushFeed(ev, true);
  if (S.openTask === ev.task_id) {
    clearTimeout(S.drawerTimer);
    S.drawerTimer = setTimeout(() => renderDrawer(ev.task_id), 150);
  }
  clearTimeout(S.panelTimer);
  S.panelTimer = setTimeout(refreshPanels, PANEL_DEBOUNCE_MS);
}

function applyTask(task, ev) {
  if (!S.lanes.has(task.lane)) { reloadLayout(); return; }
  const prev = S.tasks.get(task.id) || {};
  if (prev.updated_at && Date.parse(prev.updated_at) > Date.parse(task.updated_at)) return;
  const row = { ...prev, ...task };
  if (task.state !== "held") {
    row.holder_family = null;
  } else if (ev && ev.type === "claimed") {
    row.holder_family = ev.family;
  } else if (prev.holder !== task.holder) {
    row.holder_family = null;
  }
  if (task.state !== "waiting") row.unmet_dependencies = [];
  else if (!prev.unmet_dependencies) row.unmet_dependencies = task.depends_on;
  S.tasks.set(task.id, row);
  placeCard(row);
  updateCounts();
}

let reloading = null;
function reloadLayout() {
  if (reloading) return;
  reloading = (async () => {
    const lay = await api("GET", `/v1/layout?${new URLSearchParams(projectParams())}`);
    const proj = lay.projects.find((p) => p.slug === S.project);
    S.lanes = new Map((proj ? proj.lanes : []).map((l) => [l.key, l]));
    renderLanes();
    S.tasks.clear();
    await loadBoard();
  })().finally(() => { reloading = null; });
}

// ---------------------------------------------------------------- panels

async function refreshPanels() {
  const p = projectParams();
  const jobs = [
    all("/v1/stuck", p).then(renderStuck),
    all("/v1/demand", p).then(renderDemand),
    all("/v1/agents", p).then(renderAgents),
    all("/v1/track-record", p).then(renderFamilies),
    refreshGovernance(),
    refreshCharts(api, $("#charts"), new Set(S.lanes.keys())),
  ];
  for (const r of await Promise.allSettled(jobs)) {
    if (r.status === "rejected" && S.token) console.warn("panel:", r.reason && r.reason.message);
  }
}

function taskLink(id, title) {
  return el("a", { href: "#", class: "tasklink", text: title || short(id),
                   onclick: (e) => { e.preventDefault(); openDrawer(id, e.currentTarget); } });
}

function stuckLine(r) {
  if (r.kind === "blocked") {
    return el("li", { "data-task-id": r.id, "data-kind": r.kind },
      el("span", { class: "badge blocked", text: "blocked" }), " ",
      taskLink(r.id, r.title),
      el("div", { class: "stuck-why", text: r.blocked_reason || "blocked for a human" }),
      el("div", { class: "muted" },
        el("span", { text: `${r.lane} · ${r.stage} · blocked ` }),
        el("time", { datetime: r.blocked_since, title: new Date(r.blocked_since).toLocaleString(),
                     text: `${ago(r.blocked_since)} ago` }),
        r.blocked_by_family ? el("span", { text: ` by ${r.blocked_by_family}` }) : null,
        el("span", { text: r.human_must_lift ? " · only a human can unblock it" : " · an agent of this stage or a human can unblock it" })));
  }
  return el("li", { "data-task-id": r.id, "data-kind": r.kind },
    el("span", { class: "badge stuck", text: r.kind.replace("_", " ") }), " ",
    taskLink(r.id, r.title),
    el("div", { class: "muted", text: `${r.lane} · ${r.stage} · ${r.holder_family || "?"} ${agentName(r.holder, r.holder_family)} · silent ${duration(r.silent_for_seconds)}, held ${duration(r.held_for_seconds)}` }));
}

function renderStuck(rows) {
  const before = new Set(S.stuck.keys());
  S.stuck = new Map(rows.map((r) => [r.id, r]));
  $("#stuck-count").textContent = String(rows.length);
  // Blocked work waits on a person: it comes first.
  const ordered = [...rows.filter((r) => r.kind === "blocked"), ...rows.filter((r) => r.kind !== "blocked")];
  $("#stuck").replaceChildren(...(ordered.length ? ordered.map(stuckLine)
    : [el("li", { class: "muted", text: "nothing stuck or blocked" })]));
  for (const id of new Set([...before, ...S.stuck.keys()])) {
    const t = S.tasks.get(id);
    if (t) placeCard(t);
  }
}

function renderDemand(rows) {
  const body = $("#demand tbody");
  body.replaceChildren(...(rows.length ? rows.map((r) =>
    el("tr", { class: r.capable ? "" : "nocap", "data-lane": r.lane, "data-stage": r.stage },
       el("td", { text: `${r.lane} · ${r.stage}` }),
       el("td", {}, el("code", { text: r.features.filter((f) => !f.startsWith("lane:")).join(" ") || "—" })),
       el("td", { class: "num", text: String(r.pending), title: `${r.ready} ready, ${r.expired} expired` }),
       el("td", r.capable ? { text: r.capable_families.join(", ") }
                          : { class: "warn", text: r.note || "no capable agent",
                              title: r.closest ? `closest: ${r.closest.family}, lacks ${r.closest.missing.join(", ")}` : "" })))
    : [el("tr", {}, el("td", { colspan: "4", class: "muted", text: "no pending work" }))]));
}

function renderAgents(rows) {
  const recent = rows.filter((a) => a.holds.length || Date.now() - Date.parse(a.last_seen_at) < 15 * 60000);
  $("#agents-count").textContent = String(recent.length);
  $("#agents").replaceChildren(...(recent.length ? recent.map((a) =>
    el("li", { "data-sub": a.sub },
       el("strong", { text: a.family }), " ", el("span", { class: "muted", text: agentName(a.sub, a.family) }),
       a.family_disabled ? el("span", { class: "badge blocked", text: "disabled" }) : null,
       el("div", { class: "muted" }, a.holds.length ? ["holds ", ...a.holds.map((h) => taskLink(h.task_id, h.title))] : "idle",
          ` · last call ${ago(a.last_seen_at)} ago`)))
    : [el("li", { class: "muted", text: "no agents seen recently" })]));
}

function renderFamilies(rows) {
  // The panel refreshes under the reader: keep an open confirmation and the keyboard's place.
  let focused = $("#families").contains(document.activeElement) ? document.activeElement.getAttribute("aria-label") : null;
  if (S.refocus) { focused = S.refocus; S.refocus = null; }
  $("#families").replaceChildren(...rows.map((f) => {
    const li = el("li", { "data-family": f.key },
      el("strong", { text: f.key }), f.disabled ? el("span", { class: "badge blocked", text: "disabled" }) : null,
      el("div", { class: "muted", text: `delivered ${f.delivered} · rejected ${f.rejected} · holding ${f.holding}` }),
      el("div", { class: "features" }, f.features.map((x) => el("code", { text: x }))),
      f.denials.length ? el("div", { class: "warn", text: `denied: ${f.denials.map((d) => d.feature).join(", ")}` }) : null);
    if (oversees() && f.key !== S.me.family) li.append(familyButton(f));
    return li;
  }));
  if (focused) [...$("#families").querySelectorAll("button")].find((b) => b.getAttribute("aria-label") === focused)?.focus();
}

// Enabling is harmless; disabling refuses every agent of the family from its next call, so it asks
// first, inline: "Disable X? [Yes, disable] [No]" (No has the focus; Escape is No).
function familyButton(f) {
  const box = el("div", { class: "famact" });
  const act = async (verb) => {
    const hadFocus = box.contains(document.activeElement);
    box.querySelectorAll("button").forEach((b) => { b.disabled = true; });
    try {
      await api("POST", `/v1/families/${encodeURIComponent(f.key)}/${verb}`);
      toast(`family ${f.key} ${verb}d`);
      // The row's next button (Enable after a disable) takes the focus the pressed one had.
      if (hadFocus) S.refocus = `${verb === "disable" ? "enable" : "disable"} family ${f.key}`;
    } catch (err) {
      toast(`could not ${verb} ${f.key}: ${err.message}`, "error");
    }
    refreshPanels();
  };
  const idle = () => {
    if (S.asking === f.key) S.asking = null;
    const btn = f.disabled
      ? el("button", { type: "button", class: "quiet", text: "Enable", "aria-label": `enable family ${f.key}`,
                       onclick: () => act("enable") })
      : el("button", { type: "button", class: "quiet", text: "Disable…", "aria-label": `disable family ${f.key}`,
                       onclick: () => ask() });
    box.replaceChildren(btn);
    return btn;
  };
  const ask = (focus = true) => {
    S.asking = f.key;
    const no = el("button", { type: "button", class: "cancel", text: "No", "aria-label": `keep family ${f.key} enabled`,
                              onclick: () => idle().focus() });
    const yes = el("button", { type: "button", class: "danger confirm-yes", text: "Yes, disable",
                               "aria-label": `yes, disable family ${f.key}`, onclick: () => act("disable") });
    const q = el("div", { class: "confirm", role: "group", "aria-label": `confirm disabling ${f.key}`,
                          onkeydown: (e) => { if (e.key === "Escape") { e.stopPropagation(); idle().focus(); } } },
      el("span", { text: `Disable ${f.key}? Its agents are refused from their next call. ` }), yes, " ", no);
    box.replaceChildren(q);
    if (focus) no.focus();
  };
  if (S.asking === f.key && !f.disabled) ask(false); else idle();
  return box;
}

async function loadFeed() {
  const page = await api("GET", `/v1/feed?${new URLSearchParams({ ...projectParams(), limit: String(FEED_SIZE) })}`);
  $("#feed").replaceChildren();
  for (const ev of page.items.reverse()) pushFeed(ev, false);
}

function describe(ev) {
  const d = ev.data || {};
  switch (ev.type) {
    case "transition": return `${d.kind || "moved"} ${d.from || "?"} → ${d.to || "?"}${d.note ? `: ${d.note}` : ""}${d.reason ? `: ${d.reason}` : ""}`;
    case "created": return `created in ${d.stage || ev.stage || "?"}`;
    case "claimed": return `claimed${d.reclaimed ? " (reclaimed an expired lease)" : ""}`;
    case "progress": return d.note || "progress";
    case "blocked": return `blocked: ${d.reason || ""}`;
    case "unblocked": return `unblocked${d.note ? `: ${d.note}` : ""}`;
    case "released": return `released${d.reason ? `: ${d.reason}` : ""}`;
    case "escalated": return `escalated tier:${d.from_tier} → tier:${d.to_tier} after ${d.attempts} attempts`;
    case "ready": return `ready: what it waited on is done${d.after ? ` (${String(d.after).slice(0, 8)})` : ""}`;
    default: return ev.type;
  }
}

function pushFeed(ev, live) {
  if (S.project && ev.project && ev.project !== S.project) return;
  const list = $("#feed");
  const li = el("li", { class: `ev ev-${ev.type}` },
    el("time", { datetime: ev.created_at, text: clock(ev.created_at) }), " ",
    el("span", { class: "who", text: ev.family || ev.actor || "?" }), " ",
    taskLink(ev.task_id, ev.task_title), " ",
    el("span", { text: describe(ev) }));
  list.prepend(li);
  while (list.children.length > FEED_SIZE) list.lastChild.remove();
  if (live) li.classList.add("fresh");
}

// ---------------------------------------------------------------- drawer

async function openDrawer(id, from) {
  S.returnFocus = from || document.activeElement;
  S.openTask = id;
  $("#drawer").hidden = false;
  $("#scrim").hidden = false;
  $("#drawer-title").textContent = S.tasks.get(id)?.title || short(id);
  $("#drawer").focus();
  await renderDrawer(id);
}

function closeDrawer() {
  if ($("#drawer").hidden) return;
  $("#drawer").hidden = true;
  $("#scrim").hidden = true;
  const back = S.openTask && document.getElementById(`card-${S.openTask}`);
  S.openTask = null;
  (back || S.returnFocus)?.focus?.();
}

$("#drawer-close").addEventListener("click", closeDrawer);
$("#scrim").addEventListener("click", closeDrawer);
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape") closeDrawer();
  if (e.key === "Tab" && !$("#drawer").hidden) {     // keep focus inside the open dialog
    const f = [...$("#drawer").querySelectorAll("button, a[href], textarea, input, [tabindex='0']")].filter((x) => !x.disabled);
    if (!f.length) return;
    if (e.shiftKey && document.activeElement === f[0]) { e.preventDefault(); f[f.length - 1].focus(); }
    else if (!e.shiftKey && document.activeElement === f[f.length - 1]) { e.preventDefault(); f[0].focus(); }
  }
});

function artifactNode(a) {
  const label = a.name || a.uri || a.path || a.sha || a.type || "artifact";
  const text = `${a.type ? a.type + ": " : ""}${label}`;
  if (a.uri && /^https?:\/\//i.test(a.uri)) {
    return el("a", { href: a.uri, target: "_blank", rel: "noopener noreferrer", text });
  }
  return el("code", { text: a.uri && a.uri !== label ? `${text} (${a.uri})` : text });
}

async function renderDrawer(id) {
  let task, events;
  try {
    [task, events] = await Promise.all([api("GET", `/v1/tasks/${id}`), taskEvents(id)]);
  } catch (err) {
    $("#drawer-body").replaceChildren(el("p", { class: "error", role: "alert", text: err.message }));
    return;
  }
  if (S.openTask !== id) return;
  const row = S.tasks.get(id) || {};
  $("#drawer-title").textContent = task.title;
  const dl = el("dl", { class: "facts" });
  const fact = (k, v) => { if (v !== null && v !== undefined && v !== "") dl.append(el("dt", { text: k }), el("dd", {}, v)); };
  fact("lane · stage", `${task.lane} · ${task.stage}`);
  fact("state", el("span", { class: `statetag st-${task.state}`, text: task.state }));
  fact("priority", String(task.priority));
  fact("attempts", String(task.attempts));
  fact("rework", String(task.rework_count));
  if (task.holder) fact("holder", task.holder);
  if (task.lease_expires_at) fact("lease", el("span", { class: "lease", "data-expires": task.lease_expires_at, text: leaseText(task.lease_expires_at) }));
  if (task.required_features.length) fact("needs", el("span", {}, task.required_features.map((f) => el("code", { text: f }))));
  if (task.depends_on.length) fact("depends on", el("span", { class: "deps" }, task.depends_on.map((d) => taskLink(d, S.tasks.get(d)?.title))));
  fact("id", el("code", { text: task.id }));

  const parts = [dl];
  if (task.blocked) {
    // Lifting what the substrate blocked is a human's decision: its note goes on the governance trail (required).
    // The stuck panel says who blocked it; a task it does not list (filtered out, not loaded yet) asks for the note.
    const who = S.stuck.get(id)?.human_must_lift;
    const human = who !== false;
    const note = el("textarea", { id: "unblock-note", rows: "2", maxlength: human ? "2000" : "8000",
                                  placeholder: who === true ? "what was decided (required: it goes on the governance trail)"
                                    : who === false ? "note for the record (optional)"
                                    : "what was decided (required; if the substrate blocked it, it goes on the governance trail)",
                                  "aria-label": "unblock note" });
    const btn = el("button", { type: "button", id: "unblock", class: "primary", text: "Unblock" });
    btn.addEventListener("click", async () => {
      if (human && !note.value.trim()) {
        toast("say what was decided: lifting a block the substrate made goes on the governance trail", "error");
        note.focus();
        return;
      }
      btn.disabled = true;
      try {
        const out = await api("POST", `/v1/tasks/${id}/unblock`, note.value.trim() ? { note: note.value.trim() } : {});
        applyTask(out.task, out.event);
        toast("unblocked: claimable again");
        renderDrawer(id);
      } catch (err) {
        btn.disabled = false;
        toast(`could not unblock: ${err.message}`, "error");
      }
    });
    parts.push(el("section", { class: "blockbox", "aria-label": "blocked" },
      el("p", {}, el("strong", { text: "Blocked: " }), task.blocked_reason || "for a human"),
      oversees() ? [note, btn] : el("p", { class: "muted", text: "unblocking needs seat:overseer" })));
  }
  const arts = events.flatMap((e) => (e.data && Array.isArray(e.data.artifacts) ? e.data.artifacts : []));
  if (arts.length) parts.push(el("h3", { text: "Artifacts" }), el("ul", { class: "artifacts" }, arts.map((a) => el("li", {}, artifactNode(a)))));
  const notes = events.filter((e) => e.data && (e.data.note || e.data.reason));
  if (notes.length) {
    parts.push(el("h3", { text: "Notes" }), el("ul", { class: "notes" }, notes.map((e) =>
      el("li", {}, el("span", { class: "muted", text: `${e.family || e.actor || "?"}, ${clock(e.created_at)}: ` }), e.data.note || e.data.reason))));
  }
  parts.push(el("h3", { text: "Timeline" }), el("ol", { class: "timeline", id: "timeline" }, events.map((e) =>
    el("li", { class: `ev ev-${e.type}`, "data-type": e.type },
      el("time", { datetime: e.created_at, text: clock(e.created_at) }), " ",
      el("strong", { text: e.type }), " ",
      el("span", { class: "muted", text: e.family ? `${e.family} ${agentName(e.actor, e.family)}` : (e.actor || "") }),
      el("div", { text: describe(e) }),
      e.data && Array.isArray(e.data.artifacts) && e.data.artifacts.length
        ? el("div", { class: "artifacts" }, e.data.artifacts.map(artifactNode)) : null))));
  if (task.payload && Object.keys(task.payload).length) {
    parts.push(el("h3", { text: "Payload" }), el("pre", { text: JSON.stringify(task.payload, null, 2) }));
  }
  $("#drawer-body").replaceChildren(...parts);
}

// ---------------------------------------------------------------- workflow drawing

function drawWorkflow(wf) {
  const W = 170, H = 40, GAP = 60, TOP = 78;
  const idx = new Map(wf.stages.map((s, i) => [s.key, i]));
  const x = (i) => 12 + i * (W + GAP);
  const width = x(wf.stages.length) - GAP + 24;
  const pairs = new Map();
  let maxUp = 0, maxDown = 0;
  const arrows = [];
  const labels = [];
  for (const t of wf.transitions) {
    const a = idx.get(t.from), b = idx.get(t.to);
    if (a === undefined || b === undefined) continue;
    const fwd = b > a;
    const pk = `${Math.min(a, b)}-${Math.max(a, b)}-${fwd}`;
    const n = pairs.get(pk) || 0;
    pairs.set(pk, n + 1);
    const lift = 26 + 16 * Math.abs(b - a) + 18 * n;
    let sx, ex, sy, cy;
    if (fwd) { sx = x(a) + W * 0.7; ex = x(b) + W * 0.3; sy = TOP; cy = TOP - lift * 1.6; maxUp = Math.max(maxUp, lift); }
    else { sx = x(a) + W * 0.3; ex = x(b) + W * 0.7; sy = TOP + H; cy = TOP + H + lift * 1.6; maxDown = Math.max(maxDown, lift); }
    if (a === b) { ex = sx + 24; }
    const cls = `arrow ${t.kind}`;
    arrows.push(svg("path", { d: `M${sx},${sy} Q${(sx + ex) / 2},${cy} ${ex},${sy}`, class: cls, "marker-end": `url(#arrowhead-${t.kind})` }));
    const ly = (sy + 2 * cy + sy) / 4 + (fwd ? -4 : 12);
    const feats = (t.required_features || []).join(", ") || "anyone in the lane";
    labels.push(svg("text", { x: (sx + ex) / 2, y: ly, class: `tlabel ${t.kind}`, "text-anchor": "middle" },
      `${t.kind === "reject" ? "reject · " : ""}${feats}${t.guard ? " · guard" : ""}`));
  }
  const top = TOP - maxUp * 0.8 - 22;
  const height = TOP + H + maxDown * 0.8 + 26 - top;
  const root = svg("svg", { viewBox: `0 ${top} ${width} ${height}`, class: "wfdraw", role: "img",
                            "aria-label": `workflow ${wf.key} v${wf.version}: ${wf.transitions.map((t) => `${t.from} ${t.kind} to ${t.to} needs ${(t.required_features || []).join(" and ") || "nothing"}`).join("; ")}` });
  const defs = svg("defs");
  for (const kind of ["advance", "reject"]) {
    defs.append(svg("marker", { id: `arrowhead-${kind}`, viewBox: "0 0 10 10", refX: "9", refY: "5", markerWidth: "7", markerHeight: "7", orient: "auto-start-reverse", class: `head ${kind}` },
      svg("path", { d: "M0,0 L10,5 L0,10 z" })));
  }
  root.append(defs, ...arrows);
  wf.stages.forEach((s, i) => {
    const g = svg("g", { class: `stage${s.terminal ? " terminal" : ""}${s.initial ? " initial" : ""}` });
    g.append(svg("rect", { x: x(i), y: TOP, width: W, height: H, rx: 8 }));
    g.append(svg("text", { x: x(i) + W / 2, y: TOP + 17, "text-anchor": "middle", class: "sname" }, s.key));
    const sub = s.terminal ? "terminal" : `lease ${duration(s.lease_seconds)} · ${s.max_attempts} tries${s.escalate_after ? ` · esc@${s.escalate_after}` : ""}`;
    g.append(svg("text", { x: x(i) + W / 2, y: TOP + 31, "text-anchor": "middle", class: "ssub" }, sub));
    root.append(g);
  });
  root.append(...labels);
  return root;
}

// ---------------------------------------------------------------- go

if (S.token) start(); else showSignIn();
