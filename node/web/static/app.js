// The admin page: reads the JSON API every two seconds; actions are POST with the CSRF token.
"use strict";

const csrf = document.querySelector('meta[name="csrf-token"]').content;

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return e;
}

async function getJSON(url) {
  const r = await fetch(url, { credentials: "same-origin" });
  if (!r.ok) throw new Error(`${url}: ${r.status}`);
  return r.json();
}

async function showHealth() {
  const box = document.getElementById("health");
  try {
    const h = await getJSON("/api/health");
    const ok = (b) => el("span", { class: b ? "ok" : "bad" }, b ? "up" : "down");
    box.replaceChildren(
      "receiver ", ok(h.receiver.listening), ` (${h.receiver.ae_title}:${h.receiver.port}) · workers ${h.workers.alive} · `,
      `model ${h.model.name}${h.model.devices.length ? " on " + h.model.devices.join(", ") : " (not loaded)"} · `,
      `queue ${h.queue.depth} · free disk ${(h.disk.free_mb / 1024).toFixed(1)} GB`);
  } catch (err) {
    box.replaceChildren(el("span", { class: "bad" }, "health unavailable"));
  }
}

const STAGES = ["RECEIVING", "QUEUED", "RUNNING", "SENDING"];
const secs = (v) => (v === undefined ? "" : `${v.toFixed(1)} s`);

async function showJobs() {
  const form = document.getElementById("filters");
  const params = new URLSearchParams();
  for (const [k, v] of new FormData(form).entries()) if (v) params.set(k, v);
  const data = await getJSON(`/api/jobs?${params}`);
  const body = document.querySelector("#jobs tbody");
  body.replaceChildren(...data.jobs.map((j) => el("tr", { "data-job": j.id, "data-state": j.state },
    el("td", {}, el("a", { href: `/jobs/${j.id}` }, `#${j.id}`)),
    el("td", {}, el("span", { class: `state ${j.state}` }, j.state)),
    el("td", {}, j.study_date ?? ""),
    el("td", {}, (j.series_description ?? "") + (j.patient_name ? ` (${j.patient_name})` : "")),
    el("td", {}, j.calling_aet),
    el("td", { class: "num" }, String(j.instances)),
    ...STAGES.map((s) => el("td", { class: "num" }, secs(j.stage_seconds[s]))),
    el("td", {}, j.reason ?? ""))));
  document.getElementById("counts").replaceChildren(...Object.entries(data.counts)
    .filter(([, n]) => n).map(([s, n]) => el("span", {}, `${s} ${n}`)));
  document.getElementById("refreshed").textContent = `refreshed ${new Date().toLocaleTimeString()}`;
}

async function act(jobId, what) {
  const out = document.getElementById("action-result");
  const r = await fetch(`/api/jobs/${jobId}/${what}`, {
    method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf } });
  const body = await r.json().catch(() => ({}));
  out.textContent = r.ok ? `${what}: job is ${body.state}` : `${what} refused: ${body.detail ?? r.status}`;
  await showJob(jobId);
}

async function showJob(jobId) {
  const j = await getJSON(`/api/jobs/${jobId}`);
  document.getElementById("title").textContent = `job #${j.id}`;
  document.title = `IDAICS node - job ${j.id}`;
  const stages = Object.entries(j.stage_seconds).map(([k, v]) => `${k.toLowerCase()} ${secs(v)}`).join(", ");
  document.getElementById("summary").replaceChildren(
    el("div", {}, el("span", { class: `state ${j.state}`, id: "job-state" }, j.state), ` ${j.reason ?? ""}`),
    el("div", {}, `Series: ${j.series_description ?? "-"} · study date ${j.study_date ?? "-"} · ${j.instances} instances from ${j.calling_aet}`),
    el("div", { class: "muted" }, `Study ${j.study_instance_uid} · series ${j.series_instance_uid}`),
    el("div", {}, `Time per stage: ${stages} · attempts ${j.attempts}${j.model ? " · model " + j.model + (j.model_version ? " " + j.model_version : "") : ""}`));
  document.getElementById("retry").disabled = !j.can_retry;
  document.getElementById("resend").disabled = !j.can_resend;
  document.querySelector("#levels tbody").replaceChildren(...j.levels.map((lv) => {
    const m = lv.measurements || {};
    const num = (v, d = 1) => (v === null || v === undefined ? "-" : Number(v).toFixed(d));
    return el("tr", {},
      el("td", {}, lv.level),
      el("td", {}, ...lv.classes.map((c) => el("span", { class: `cls-${c}` }, c + " "))),
      el("td", { class: "num" }, num(lv.confidence, 2)),
      el("td", { class: "num" }, num(m.extension_mm)),
      el("td", { class: "num" }, m.extension_share === null || m.extension_share === undefined ? "-" : `${Math.round(m.extension_share * 100)}%`),
      el("td", { class: "num" }, num(m.disc_area_mm2, 0)),
      el("td", {}, (lv.warnings || []).join("; ")));
  }));
  document.getElementById("warnings").textContent = j.warnings.length ? `Warnings: ${j.warnings.join("; ")}` : "";
  const pics = document.getElementById("previews");
  if (pics.childElementCount !== j.previews.length) {
    pics.replaceChildren(...j.previews.map((p) => el("img", {
      src: `/api/jobs/${j.id}/previews/${encodeURIComponent(p)}.png`, alt: `${p} preview` })));
  }
  document.getElementById("objects").replaceChildren(...j.objects.map((o) => el("li", {}, o)));
  document.querySelector("#deliveries tbody").replaceChildren(...j.deliveries.map((d) => el("tr", {},
    el("td", {}, d.destination), el("td", {}, d.address), el("td", {}, d.state),
    el("td", { class: "num" }, String(d.attempts)), el("td", {}, d.last_error ?? ""), el("td", {}, d.sent_at ?? ""),
    el("td", {}, d.history.map((h) => h.held_by ? `${h.at} sending (${h.held_by})` : `${h.at} ${h.ok ? "ok" : "failed: " + h.error} (${h.seconds} s)`).join(" | ")))));
  const sh = j.shadow;
  document.getElementById("shadow-section").hidden = !sh;
  if (sh) {
    document.getElementById("shadow-model").textContent = sh.error
      ? `${sh.model}: failed (${sh.error})`
      : `${sh.model} ${sh.model_version ?? ""}: agrees on ${sh.agree} of ${sh.compared} levels (${sh.seconds} s)`;
    document.querySelector("#shadow tbody").replaceChildren(...(sh.levels || []).map((r) => el("tr", {},
      el("td", {}, r.level), el("td", {}, (r.live || ["-"]).join(" ")),
      el("td", { class: r.agree ? "" : "changed" }, (r.shadow || ["-"]).join(" ")),
      el("td", {}, r.agree ? "yes" : "no"))));
  }
  document.querySelector("#cases tbody").replaceChildren(...j.cases.flatMap((c) => c.levels.map((lv, i) => el("tr", {},
    el("td", {}, i ? "" : `#${c.id}`), el("td", {}, i ? "" : String(c.seg_job)), el("td", {}, i ? "" : String(c.analysed_job)),
    el("td", {}, lv.level), el("td", {}, lv.node_classes.join(" ")),
    el("td", { class: lv.changed ? "changed" : "" }, lv.classes.join(" ")),
    el("td", {}, i ? "" : c.problems.join("; "))))));
  document.querySelector("#audit tbody").replaceChildren(...j.audit.map((e) => el("tr", {},
    el("td", {}, e.at), el("td", {}, e.actor), el("td", {}, e.event), el("td", {}, e.detail ?? ""))));
}

function every(ms, fn) {
  const run = () => fn().catch((err) => console.error(err));
  run();
  return setInterval(run, ms);
}

document.addEventListener("DOMContentLoaded", () => {
  every(5000, showHealth);
  if (document.body.dataset.page === "dashboard") {
    every(2000, showJobs);
    document.getElementById("filters").addEventListener("change", () => showJobs());
  } else {
    const jobId = Number(location.pathname.split("/").pop());
    every(2000, () => showJob(jobId));
    document.getElementById("retry").addEventListener("click", () => act(jobId, "retry"));
    document.getElementById("resend").addEventListener("click", () => act(jobId, "resend"));
  }
});
