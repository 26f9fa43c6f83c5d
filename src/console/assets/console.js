// ferry console: live updates of the jobs page and of one agent job.
// Everything is written with textContent (never innerHTML), so nothing the
// server relays from vCenter or agents can become markup.
"use strict";

function human(b) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = b, i = 0;
  while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
  return i === 0 ? b + " B" : v.toFixed(1) + " " + u[i];
}

function progress(done, total) {
  if (!total) return human(done);
  return human(done) + " of " + human(total) + " (" + Math.min(100, Math.floor(done * 100 / total)) + "%)";
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  if (cls) td.className = cls;
  td.textContent = text;
  tr.appendChild(td);
  return td;
}

async function fetchJson(url) {
  const r = await fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } });
  if (r.status === 401) { window.location = "/login?why=expired&next=" + encodeURIComponent(location.pathname); return null; }
  if (!r.ok) throw new Error(url + ": " + r.status);
  return r.json();
}

async function updateRunning(table) {
  const items = await fetchJson(table.dataset.live);
  if (!items) return;
  const body = table.tBodies[0];
  const rows = [];
  for (const i of items) {
    const tr = document.createElement("tr");
    tr.dataset.moref = i.moref;
    const a = document.createElement("a");
    a.href = "/vms/" + encodeURIComponent(i.moref);
    a.textContent = i.vm;
    const td = document.createElement("td");
    td.appendChild(a);
    tr.appendChild(td);
    cell(tr, i.tenant);
    cell(tr, i.run_id);
    cell(tr, i.state + (i.waiting ? " (" + i.waiting + ")" : "") + (i.error ? ": " + i.error : ""), "state");
    cell(tr, i.agent || "-");
    cell(tr, progress(i.bytes_done, i.bytes_total), "progress");
    cell(tr, human(Math.round(i.rate)) + "/s", "rate");
    cell(tr, i.eta_s == null ? "-" : Math.round(i.eta_s) + " s", "eta");
    rows.push(tr);
  }
  if (rows.length === 0) {
    const tr = document.createElement("tr");
    tr.className = "empty";
    const td = cell(tr, "Nothing running.");
    td.colSpan = 8;
    rows.push(tr);
  }
  body.replaceChildren(...rows);
}

async function updateAgentJob(dl) {
  const j = await fetchJson(dl.dataset.live);
  if (!j) return;
  dl.querySelector(".state").textContent = j.state;
  dl.querySelector(".progress").textContent = progress(j.bytes_done, j.bytes_total);
  dl.querySelector(".rate").textContent = human(Math.round(j.rate_bytes_per_sec)) + "/s";
  dl.querySelector(".eta").textContent = j.eta_secs == null ? "-" : Math.round(j.eta_secs) + " s";
  dl.querySelector(".job-error").textContent = j.error ? j.error.code + ": " + j.error.message : "";
  const notes = dl.querySelector(".notes");
  if (notes) notes.replaceChildren(...(j.notes || []).map((n) => {
    const d = document.createElement("div");
    d.textContent = n;
    return d;
  }));
  return j.state;
}

function live(el, update) {
  const status = document.getElementById("live-status");
  const tick = async () => {
    try {
      const state = await update(el);
      if (status) status.textContent = "Updated " + new Date().toLocaleTimeString() + ".";
      if (state === "succeeded" || state === "failed" || state === "cancelled") return;
    } catch (e) {
      if (status) status.textContent = "Update failed: " + e.message;
    }
    setTimeout(tick, 2000);
  };
  setTimeout(tick, 2000);
}

// The restore form: the directory field only for directory restores.
function restoreForm() {
  const path = document.getElementById("path");
  const dir = document.getElementById("kind-directory");
  const vm = document.getElementById("kind-vm");
  if (!path || !dir || !vm) return;
  const sync = () => { path.disabled = !dir.checked; path.required = dir.checked; };
  dir.addEventListener("change", sync);
  vm.addEventListener("change", sync);
  sync();
}

document.addEventListener("DOMContentLoaded", () => {
  restoreForm();
  const running = document.getElementById("running");
  if (running) live(running, updateRunning);
  const job = document.getElementById("agent-job");
  if (job) live(job, updateAgentJob);
});
