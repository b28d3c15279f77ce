// lungvl coordinator dashboard: polls the read-only JSON API and redraws (no library, nothing downloaded).
"use strict";

const POLL_MS = 2000;
let selected = null;      // run id chosen by the user (null: follow the latest run)
let lastPlotKey = "";     // redraw the SVG plots only when the run changed

const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function fmt(v, digits = 4) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "number" && !Number.isInteger(v)) return v.toPrecision(digits).replace(/\.?0+(e|$)/, "$1");
  return String(v);
}

function selectedFromHash() {
  const m = /run=(\d+)/.exec(location.hash);
  return m ? Number(m[1]) : null;
}

async function getJSON(url) {
  const res = await fetch(url, { cache: "no-store" });
  const body = await res.json();
  if (!res.ok) throw new Error(body.error || res.statusText);
  return body;
}

function renderRuns(doc, shownId) {
  $("registry").textContent = doc.registry;
  const ul = $("runs");
  ul.replaceChildren();
  for (const run of doc.runs) {
    const li = el("li");
    li.dataset.runId = run.id;
    if (run.id === shownId) li.classList.add("selected");
    const title = el("div");
    title.append(el("strong", `${run.name} #${run.id} `), el("span", run.status, `badge ${run.status}`));
    const planned = run.rounds_planned === null ? "?" : run.rounds_planned;
    li.append(title, el("div", `${run.rounds_completed}/${planned} rounds · ${run.created_at.slice(0, 19).replace("T", " ")}`, "sub"));
    li.addEventListener("click", () => { location.hash = `run=${run.id}`; });
    ul.append(li);
  }
}

function renderHead(doc) {
  const run = doc.run, p = doc.progress, priv = doc.privacy;
  $("run-name").textContent = `${run.name} (#${run.id})`;
  const badge = $("run-status");
  badge.textContent = run.status;
  badge.className = `badge ${run.status}`;
  const planned = p.rounds_planned;
  $("progress-bar").style.width = planned ? `${Math.min(100, (100 * p.rounds_completed) / planned)}%` : "0";
  $("progress-text").textContent =
    `${p.rounds_completed} of ${planned === null ? "?" : planned} rounds completed (${p.rounds_recorded} recorded)`;
  const bits = [`started ${run.created_at.slice(0, 19).replace("T", " ")} UTC`];
  if (run.finished_at) bits.push(`ended ${run.finished_at.slice(0, 19).replace("T", " ")} UTC`);
  if (priv.sampling) bits.push(`site sampling: ${priv.sampling}`);
  if (priv.reproducible_noise) bits.push("NOISE REPRODUCIBLE: NOT PRIVATE");
  $("run-meta").textContent = bits.join(" · ");

  $("epsilon").textContent = priv.epsilon === null ? "no client-level DP" : fmt(priv.epsilon);
  const bar = $("epsilon-bar");
  bar.style.width = priv.budget_used === null ? "0" : `${Math.min(100, 100 * priv.budget_used)}%`;
  bar.classList.toggle("over", priv.budget_used !== null && priv.budget_used >= 1);
  const budget = priv.epsilon_budget === null ? "no ε budget set" : `budget ε = ${fmt(priv.epsilon_budget)}`;
  const delta = priv.delta === null ? "" : ` at δ = ${priv.delta.toExponential(0)}`;
  const site = priv.max_site_epsilon === null ? "" : ` · max patient-level ε ${fmt(priv.max_site_epsilon)} (${priv.max_site_epsilon_site})`;
  $("epsilon-budget").textContent = budget + delta + site;

  $("site-count").textContent = String(doc.sites.length);
  $("failure-count").textContent = `${doc.failures.length} site repl${doc.failures.length === 1 ? "y" : "ies"} left out`;
  const latest = $("latest-metrics");
  latest.replaceChildren();
  const names = Object.keys(doc.latest_global_metrics).sort();
  if (!names.length) latest.append(el("span", "none yet", "muted"));
  for (const n of names) latest.append(el("div", `${n} = ${fmt(doc.latest_global_metrics[n])}`));
}

// metric columns of the rounds table (all metrics are in the "latest" card and the plots)
const PREFERRED_METRICS = ["train_loss", "val_loss", "val_auc", "val_dice", "val_lung_rads_acc"];

function metricColumns(doc) {
  const cols = PREFERRED_METRICS.filter((n) => doc.metric_names.includes(n));
  return cols.length ? cols : doc.metric_names.slice(0, 4);
}

function renderRounds(doc) {
  const table = $("rounds");
  const cols = metricColumns(doc);
  const head = el("tr");
  for (const h of ["round", "status", "sampled", "replied", "failed", "update norm", "ε", ...cols]) head.append(el("th", h));
  table.tHead.replaceChildren(head);
  const body = table.tBodies[0];
  body.replaceChildren();
  for (const r of doc.rounds) {
    const tr = el("tr", null, r.status);
    tr.dataset.round = r.round;
    tr.dataset.status = r.status;
    const values = [r.round, r.status, r.sampled, r.replied, r.failed, fmt(r.update_norm), fmt(r.epsilon)];
    for (const v of [...values, ...cols.map((n) => fmt(r.metrics[n]))]) tr.append(el("td", v === null ? "–" : v));
    body.append(tr);
  }
}

function renderParticipation(doc) {
  const table = $("participation");
  const sites = doc.sites.map((s) => s.site);
  const head = el("tr");
  head.append(el("th", "site"));
  for (const r of doc.rounds) head.append(el("th", r.round));
  table.tHead.replaceChildren(head);
  const body = table.tBodies[0];
  body.replaceChildren();
  for (const site of sites) {
    const tr = el("tr");
    tr.append(el("td", site));
    for (const r of doc.rounds) {
      const st = r.sites[site];
      const td = el("td", st === undefined ? "·" : st === "ok" ? "✓" : st, "cell");
      if (st !== undefined) td.classList.add(st === "ok" ? "ok" : "bad");
      td.title = `round ${r.round}: ${st === undefined ? "not sampled" : st}`;
      tr.append(td);
    }
    body.append(tr);
  }
}

function renderSites(doc) {
  const body = $("sites").tBodies[0];
  body.replaceChildren();
  for (const s of doc.sites) {
    const tr = el("tr", null, s.last_status === "ok" ? "" : "failed");
    for (const v of [s.site, s.ok, s.not_ok, s.examples, s.last_status, s.last_reason || "–", fmt(s.epsilon)]) tr.append(el("td", v));
    body.append(tr);
  }
  const ul = $("failures");
  ul.replaceChildren();
  if (!doc.failures.length) ul.append(el("li", "none", "muted"));
  for (const f of doc.failures) ul.append(el("li", `round ${f.round}: ${f.site} ${f.status}${f.reason ? ": " + f.reason : ""}`));
}

async function renderPlots(doc) {
  const key = JSON.stringify([doc.run.id, doc.run.status, doc.rounds.map((r) => [r.round, r.status, r.epsilon, r.metrics])]);
  if (key === lastPlotKey) return;
  const [metrics, eps] = await Promise.all(
    ["metrics", "epsilon"].map((k) => fetch(`/plots/${doc.run.id}/${k}.svg`, { cache: "no-store" }).then((r) => r.text())),
  );
  $("plot-metrics").innerHTML = metrics;  // SVG built server-side with every text XML-escaped
  $("plot-epsilon").innerHTML = eps;
  lastPlotKey = key;
}

let busy = false;          // a slow registry never stacks requests

async function refresh() {
  if (busy) return;
  busy = true;
  try {
    selected = selectedFromHash();
    const runs = await getJSON("/api/runs");
    const shown = selected ?? (runs.runs.length ? runs.runs[0].id : null);
    renderRuns(runs, shown);
    if (shown !== null) {
      const doc = await getJSON(`/api/runs/${shown}`);
      renderHead(doc);
      renderRounds(doc);
      renderParticipation(doc);
      renderSites(doc);
      await renderPlots(doc);
    }
    $("error").hidden = true;
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.lastRefresh = String(Date.now());
  } catch (err) {
    $("error").textContent = `cannot read the registry: ${err.message}`;
    $("error").hidden = false;
  } finally {
    busy = false;
  }
}

window.addEventListener("hashchange", () => { lastPlotKey = ""; refresh(); });
refresh();
setInterval(refresh, POLL_MS);
