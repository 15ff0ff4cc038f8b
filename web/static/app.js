// replicate-relay UI: live updates over Server-Sent Events and small conveniences.
// No inline script anywhere (the Content-Security-Policy forbids it); no framework, no build step.
"use strict";

function liveStatus(on) {
  const el = document.getElementById("live-status");
  if (el) el.hidden = !on;
}

function listPage() {
  const table = document.getElementById("deliveries");
  if (!table || table.dataset.live !== "1") return;
  const tbody = document.getElementById("rows");
  const query = table.dataset.query || "";
  const topId = () => {
    const first = tbody.querySelector("tr[data-id]");
    return first ? Number(first.dataset.id) : 0;
  };
  let fetching = false;
  let again = false;

  async function fetchNew() {
    if (fetching) { again = true; return; }
    fetching = true;
    try {
      const params = new URLSearchParams(query);
      params.set("after", String(topId()));
      const resp = await fetch("/ui/rows?" + params.toString(), { credentials: "same-origin" });
      if (!resp.ok) return;
      const tpl = document.createElement("template");
      tpl.innerHTML = await resp.text();  // server-rendered and autoescaped
      const rows = Array.from(tpl.content.querySelectorAll("tr[data-id]"));
      for (const row of rows.reverse()) {
        const old = tbody.querySelector(`tr[data-id="${row.dataset.id}"]`);
        if (old) continue;
        row.classList.add("fresh");
        tbody.insertBefore(row, tbody.firstChild);
      }
      const empty = document.getElementById("empty");
      if (empty && rows.length) empty.remove();
    } finally {
      fetching = false;
      if (again) { again = false; fetchNew(); }
    }
  }

  async function refreshRow(id) {
    const old = tbody.querySelector(`tr[data-id="${id}"]`);
    if (!old) return;
    const params = new URLSearchParams(query);
    params.set("after", String(id - 1));
    params.set("before", String(id + 1));
    const resp = await fetch("/ui/rows?" + params.toString(), { credentials: "same-origin" });
    if (!resp.ok) return;
    const tpl = document.createElement("template");
    tpl.innerHTML = await resp.text();
    const row = tpl.content.querySelector("tr[data-id]");
    if (row) {
      const checked = old.querySelector("input.pick")?.checked;
      if (checked) row.querySelector("input.pick").checked = true;
      old.replaceWith(row);
    }
  }

  const source = new EventSource("/api/events");
  // On every (re)connect, fetch what arrived while the stream was not yet (or no longer) open.
  source.addEventListener("open", () => { liveStatus(true); fetchNew(); });
  source.addEventListener("error", () => liveStatus(false));
  source.addEventListener("delivery", () => fetchNew());
  source.addEventListener("attempt", (ev) => {
    const data = JSON.parse(ev.data);
    refreshRow(Number(data.delivery));
  });
  window.relayEvents = source;
}

async function postJSON(url, payload) {
  const resp = await fetch(url, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(payload),
  });
  let data = {};
  try { data = await resp.json(); } catch (err) { data = { error: "HTTP " + resp.status }; }
  return { ok: resp.ok, status: resp.status, data };
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const child of children) node.append(child);  // strings become text nodes: never HTML
  return node;
}

function target(selectValue, url) {
  if (selectValue.startsWith("upstream:")) return { upstream: selectValue.slice("upstream:".length) };
  return { url };
}

async function refreshForwarding() {
  // Re-render the forwarding section from the server (the page is the single source of markup).
  const resp = await fetch(window.location.href, { credentials: "same-origin" });
  if (!resp.ok) return;
  const doc = new DOMParser().parseFromString(await resp.text(), "text/html");
  const fresh = doc.getElementById("forwarding");
  const current = document.getElementById("forwarding");
  if (fresh && current) current.replaceWith(fresh);
}

function deliveryPage() {
  const page = document.getElementById("delivery");
  if (!page) return;
  const id = Number(page.dataset.id);

  const form = document.getElementById("replay-form");
  const select = document.getElementById("replay-target");
  const url = document.getElementById("replay-url");
  const edit = document.getElementById("replay-edit");
  const body = document.getElementById("replay-body");
  const resign = document.getElementById("replay-resign");
  const showUrl = () => { url.hidden = select.value !== "url"; };
  select.addEventListener("change", showUrl);
  showUrl();
  edit.addEventListener("change", () => {
    body.hidden = !edit.checked;
    if (edit.checked) { resign.checked = true; resign.disabled = true; } else { resign.disabled = false; }
  });
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const out = document.getElementById("replay-result");
    const payload = { ...target(select.value, url.value), resign: resign.checked };
    if (edit.checked) {
      try { JSON.parse(body.value); } catch (err) {
        if (!window.confirm("The edited body is not valid JSON. Send it anyway?")) return;
      }
      payload.body = body.value;
    }
    out.replaceChildren("Sending…");
    const { ok, data } = await postJSON(`/api/deliveries/${id}/replay`, payload);
    if (!ok) { out.replaceChildren(el("span", { class: "bad" }, data.error || "failed")); return; }
    const a = data.attempt;
    const answer = a.status !== null ? `HTTP ${a.status}` : a.error;
    out.replaceChildren(
      el("span", { class: a.outcome === "delivered" ? "ok" : "bad", id: "replay-status" }, answer),
      ` in ${a.duration_ms} ms → ${a.target}`,
      el("pre", { class: "body" }, a.response_body === null ? "(binary response)" : a.response_body),
    );
    await refreshForwarding();
  });

  const verify = document.getElementById("verify-form");
  verify.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const out = document.getElementById("verify-result");
    const secret = document.getElementById("verify-secret").value;
    const { ok, data } = await postJSON(`/api/deliveries/${id}/verify`, secret ? { secret } : {});
    if (!ok) { out.replaceChildren(el("span", { class: "bad" }, data.error || "failed")); return; }
    const good = data.verdict === "verified" || data.verdict === "unsigned";
    out.replaceChildren(
      el("span", { class: `badge verdict-${data.verdict}`, id: "verify-verdict" }, data.verdict.replace(/_/g, " ")),
      " ", data.detail, el("span", { class: "muted" }, ` (secret: ${data.secret}; stored verdict: ${data.stored_verdict})`),
    );
    out.dataset.good = String(good);
  });

  const source = new EventSource("/api/events");
  source.addEventListener("open", () => liveStatus(true));
  source.addEventListener("error", () => liveStatus(false));
  source.addEventListener("attempt", (ev) => {
    const data = JSON.parse(ev.data);
    if (Number(data.delivery) === id) refreshForwarding();
  });
}

function listActions() {
  const table = document.getElementById("deliveries");
  const compare = document.getElementById("compare");
  if (!table || !compare) return;
  const picked = () => Array.from(table.querySelectorAll("input.pick:checked")).map((c) => Number(c.value));
  table.addEventListener("change", () => { compare.disabled = picked().length !== 2; });
  compare.addEventListener("click", () => {
    const [a, b] = picked().sort((x, y) => x - y);
    window.location.href = `/diff?a=${a}&b=${b}`;
  });

  const bulk = document.getElementById("bulk-replay");
  const select = document.getElementById("bulk-target");
  const url = document.getElementById("bulk-url");
  const progress = document.getElementById("bulk-progress");
  select.addEventListener("change", () => { url.hidden = select.value !== "url"; });
  let job = null;
  const show = (p) => {
    progress.textContent = `${p.finished ? "Done" : "Replaying"}: ${p.done}/${p.total} (${p.ok} ok, ${p.failed} failed)`;
  };
  bulk.addEventListener("click", async () => {
    const filter = JSON.parse(bulk.dataset.filter || "{}");
    const picks = picked();
    const payload = { ...target(select.value, url.value), resign: true };
    if (picks.length) payload.ids = picks; else payload.filter = filter;
    const what = picks.length ? `${picks.length} selected deliveries` : "every delivery matching these filters";
    if (!window.confirm(`Replay ${what}?`)) return;
    const { ok, data } = await postJSON("/api/replay", payload);
    if (!ok) { progress.textContent = data.error || "failed"; return; }
    job = data.job;
    show({ done: 0, total: data.queued, ok: 0, failed: 0, finished: data.queued === 0 });
    const poll = async () => {
      const resp = await fetch(`/api/replay/${job}`, { credentials: "same-origin" });
      if (!resp.ok) return;
      const p = await resp.json();
      show(p);
      if (!p.finished) setTimeout(poll, 1000);
    };
    setTimeout(poll, 1000);
  });
  if (window.relayEvents) {
    window.relayEvents.addEventListener("replay", (ev) => {
      const p = JSON.parse(ev.data);
      if (p.job === job) show(p);
    });
  }
}

function copyButtons() {
  for (const button of document.querySelectorAll("button.copy")) {
    button.addEventListener("click", async () => {
      const target = document.querySelector(button.dataset.copy);
      if (!target) return;
      try {
        await navigator.clipboard.writeText(target.textContent);
        button.textContent = "Copied";
      } catch (err) {
        const range = document.createRange();
        range.selectNodeContents(target);
        const sel = window.getSelection();
        sel.removeAllRanges();
        sel.addRange(range);
        button.textContent = "Selected: press Ctrl+C";
      }
    });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  listPage();
  listActions();
  deliveryPage();
  copyButtons();
});
