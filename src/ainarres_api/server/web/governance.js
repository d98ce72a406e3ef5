// The board's governance part (ADR 0015): the "Needs you" inbox (tasks blocked for a human,
// recommendations, flags, work nobody unbanned can serve) with the overseer's acts, and the governance
// panel (strikes, bans with their expiry, the trail). Plain JS, no build step (ADR 0007); board.js hands
// in what it shares (api, el, toast, openTask, seated) through mountGovernance().

let B = null;  // what board.js shares
const G = { root: null, busy: false };

export function mountGovernance(shared) {
  B = shared;
  if (G.root && G.root.isConnected) return;
  const panels = document.querySelector(".panels");
  if (!panels) return;
  const inbox = B.el("section", { class: "panel needs-you", id: "inbox-panel", "aria-labelledby": "inbox-h" },
    B.el("h2", { id: "inbox-h" }, "Needs you ", B.el("span", { class: "count", id: "inbox-count", text: "0" })),
    B.el("p", { class: "muted panel-note", text: "What only a person can decide: blocks the substrate made, recommendations, flags, work nobody can serve." }),
    B.el("ul", { id: "inbox", class: "rows" }));
  const gov = B.el("section", { class: "panel", id: "governance-panel", "aria-labelledby": "governance-h" },
    B.el("h2", { id: "governance-h", text: "Governance" }),
    B.el("h3", { text: "Bans" }), B.el("ul", { id: "gov-bans", class: "rows" }),
    B.seated() ? banForm() : null,
    B.el("h3", { text: "Strikes" }), B.el("ul", { id: "gov-strikes", class: "rows" }),
    B.el("h3", { text: "Trail" }), B.el("ol", { id: "gov-trail", class: "rows" }));
  panels.prepend(inbox, gov);
  G.root = inbox;
}

// A permanent ban is a person's decision: family, feature and a reason, all required.
function banForm() {
  const family = B.el("input", { type: "text", required: true, placeholder: "family", "aria-label": "ban: family" });
  const feature = B.el("input", { type: "text", required: true, placeholder: "role:…", "aria-label": "ban: feature" });
  const reason = B.el("input", { type: "text", required: true, placeholder: "why (kept on the trail)", "aria-label": "ban: reason" });
  const form = B.el("form", { class: "govform", id: "gov-ban-form", "aria-label": "ban a family permanently",
    onsubmit: async (e) => {
      e.preventDefault();
      const body = { family: family.value.trim(), feature: feature.value.trim(), reason: reason.value.trim() };
      if (!body.family || !body.feature || !body.reason) return;
      try {
        await B.api("POST", "/v1/governance/bans", body);
        B.toast(`${body.family} banned from ${body.feature}`);
        form.reset();
      } catch (err) {
        B.toast(`ban: ${err.message}`, "error");
      }
      refreshGovernance();
      B.refresh();
    } },
    family, feature, reason, B.el("button", { type: "submit", class: "danger", text: "Ban permanently" }));
  return form;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "until lifted";
}

// One act with a required note: a small inline form, so nothing happens on a single stray click.
function actForm(label, placeholder, run) {
  const box = B.el("div", { class: "govact" });
  const open = () => {
    const input = B.el("input", { type: "text", required: true, placeholder, "aria-label": `${label}: note` });
    const form = B.el("form", { class: "govform", onsubmit: async (e) => {
      e.preventDefault();
      const note = input.value.trim();
      if (!note) { input.focus(); return; }
      form.querySelectorAll("button, input").forEach((n) => { n.disabled = true; });
      G.busy = false;
      try {
        await run(note);
        B.toast(`${label}: done`);
      } catch (err) {
        B.toast(`${label}: ${err.message}`, "error");
      }
      refreshGovernance();
      B.refresh();
    } },
      input, " ",
      B.el("button", { type: "submit", class: "danger", text: label }), " ",
      B.el("button", { type: "button", class: "cancel", text: "Cancel", onclick: () => { G.busy = false; idle(); } }));
    G.busy = true;
    box.replaceChildren(form);
    input.focus();
  };
  const idle = () => box.replaceChildren(B.el("button", { type: "button", class: "quiet", text: `${label}…`,
                                                          "aria-label": label, onclick: open }));
  idle();
  return box;
}

function inboxRows(stuck, st, demand) {
  const rows = [];
  const seated = B.seated();
  for (const r of stuck.filter((x) => x.kind === "blocked")) {
    rows.push(B.el("li", { "data-inbox": "blocked", "data-task-id": r.id },
      B.el("span", { class: `badge ${r.human_must_lift ? "blocked" : "stuck"}`, text: r.human_must_lift ? "blocked by the substrate" : "blocked" }), " ",
      B.openTask(r.id, r.title),
      B.el("div", { class: "stuck-why", text: r.blocked_reason || "" }),
      B.el("div", { class: "muted", text: `${r.lane} · ${r.stage}${r.human_must_lift ? " · only a human can unblock it" : ""}` }),
      seated ? actForm(`Unblock ${r.title}`, "what was decided (kept on the trail)",
                       (note) => B.api("POST", "/v1/governance/unblock", { task_id: r.id, note })) : null));
  }
  for (const r of st.recommendations) {
    const what = r.feature ? `${r.family} from ${r.feature}` : `${r.family} (family-wide)`;
    rows.push(B.el("li", { "data-inbox": "recommendation", "data-family": r.family },
      B.el("span", { class: "badge rec", text: "recommendation" }), " ",
      B.el("strong", { text: `Permanent ban: ${what}` }),
      B.el("div", { class: "muted", text: r.reason }),
      seated && r.feature ? actForm(`Ban ${r.family} from ${r.feature}`, "why (kept on the trail)",
        (reason) => B.api("POST", `/v1/governance/recommendations/${r.id}/accept`, { reason })) : null,
      seated ? actForm(`Dismiss recommendation for ${r.family}`, "why not",
        (reason) => B.api("POST", `/v1/governance/recommendations/${r.id}/dismiss`, { reason })) : null));
  }
  for (const f of st.flags) {
    rows.push(B.el("li", { "data-inbox": "flag", "data-family": f.family },
      B.el("span", { class: "badge flag", text: `${f.kind} flag` }), " ",
      B.el("strong", { text: f.feature ? `${f.family} · ${f.feature}` : f.family }),
      f.task_id ? [" on ", B.openTask(f.task_id, null)] : null,
      B.el("div", { class: "muted", text: `${f.note} — ${f.raised_by}` }),
      seated ? actForm(`Dismiss flag ${f.id}`, "why",
        (reason) => B.api("POST", `/v1/governance/flags/${f.id}/dismiss`, { reason })) : null));
  }
  for (const d of demand.filter((x) => !x.capable)) {
    rows.push(B.el("li", { "data-inbox": "nobody", "data-lane": d.lane },
      B.el("span", { class: "badge stuck", text: "nobody can serve" }), " ",
      B.el("strong", { text: `${d.lane} · ${d.stage}` }),
      B.el("div", { class: "muted", text: `${d.pending} pending, needs ${d.features.filter((x) => !x.startsWith("lane:")).join(" ") || "—"}`
        + (d.banned_families && d.banned_families.length ? ` · banned: ${d.banned_families.join(", ")}` : "") })));
  }
  return rows;
}

function banRows(st) {
  const seated = B.seated();
  return st.bans.map((b) => B.el("li", { "data-ban": `${b.family}/${b.feature}` },
    B.el("strong", { text: b.family }), " ", B.el("code", { text: b.feature }), " ",
    B.el("span", { class: `badge ${b.governance === "permanent" ? "blocked" : "stuck"}`,
                   text: b.governance === "reflexive" ? "temporary" : (b.governance || "denial") }),
    B.el("div", { class: "muted", text: `${b.reason} · ${b.expires_at ? `ends ${when(b.expires_at)}` : "until lifted"}` }),
    seated && b.family !== B.me().family ? actForm(`Lift ${b.family} ${b.feature}`, "why (kept on the trail)",
      (reason) => B.api("POST", "/v1/governance/lifts", { family: b.family, feature: b.feature, reason })) : null));
}

export async function refreshGovernance(stuck, demand) {
  if (!B || !G.root) return;
  if (G.busy && G.root.contains(document.activeElement)) return;  // do not redraw under a note being typed
  const params = B.params();
  const [st, s, d] = await Promise.all([
    B.api("GET", "/v1/governance"),
    stuck ? Promise.resolve(stuck) : B.all("/v1/stuck", { ...params, kind: "blocked" }),
    demand ? Promise.resolve(demand) : B.all("/v1/demand", params),
  ]);
  if (G.busy && document.getElementById("governance-panel").contains(document.activeElement)) return;
  const inbox = inboxRows(s, st, d);
  document.getElementById("inbox-count").textContent = String(inbox.length);
  document.getElementById("inbox").replaceChildren(...(inbox.length ? inbox
    : [B.el("li", { class: "muted", text: "nothing needs you" })]));
  document.getElementById("gov-bans").replaceChildren(...(st.bans.length ? banRows(st)
    : [B.el("li", { class: "muted", text: "no bans" })]));
  document.getElementById("gov-strikes").replaceChildren(...(st.strikes.length ? st.strikes.map((x) =>
    B.el("li", { "data-strike": `${x.family}/${x.feature}` },
      B.el("strong", { text: x.family }), " ", B.el("code", { text: x.feature }),
      B.el("span", { class: "muted", text: ` ${x.strikes}/${x.threshold} strikes · ${x.bans} ban(s)${x.banned ? ` · banned ${x.banned_until ? `until ${when(x.banned_until)}` : "permanently"}` : ""}` })))
    : [B.el("li", { class: "muted", text: "no strikes" })]));
  document.getElementById("gov-trail").replaceChildren(...(st.trail.length ? st.trail.slice(0, 30).map((e) =>
    B.el("li", { "data-action": e.action },
      B.el("span", { class: "muted", text: `${new Date(e.at).toLocaleTimeString()} ` }),
      B.el("strong", { text: e.action.replace(/_/g, " ") }), " ",
      B.el("span", { text: [e.family, e.feature].filter(Boolean).join(" · ") }),
      B.el("div", { class: "muted", text: `${e.actor}: ${e.reason}` })))
    : [B.el("li", { class: "muted", text: "nothing yet" })]));
}
