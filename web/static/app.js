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
  source.addEventListener("open", () => liveStatus(true));
  source.addEventListener("error", () => liveStatus(false));
  source.addEventListener("delivery", () => fetchNew());
  source.addEventListener("attempt", (ev) => {
    const data = JSON.parse(ev.data);
    refreshRow(Number(data.delivery));
  });
  window.relayEvents = source;
}

function deliveryPage() {
  const el = document.getElementById("delivery");
  if (!el) return;
  const id = Number(el.dataset.id);
  const source = new EventSource("/api/events");
  source.addEventListener("open", () => liveStatus(true));
  source.addEventListener("error", () => liveStatus(false));
  source.addEventListener("attempt", (ev) => {
    const data = JSON.parse(ev.data);
    if (Number(data.delivery) === id && !document.querySelector("[data-busy]")) window.location.reload();
  });
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
  deliveryPage();
  copyButtons();
});
