// Your jobs: the key's jobs of the last hour (GET /v1/jobs), newest first, whichever panel or client submitted
// them, so a job that outlives the page is still found after a reload. One row per job, updated in place (a
// focused Cancel button stays focused while the list polls); a succeeded generation's first image as a thumbnail;
// cancel (POST /v1/jobs/{id}/cancel); older pages with starting_after; a status filter. It reloads when any panel
// submits a job (the "latentd:submitted" event from JobPanel.run) and every POLL_MS while a listed job is queued
// or running and the tab is visible.

import { fetchBlob, request, TERMINAL } from "./api.js";
import { $, clearErrors, el, showError } from "./ui.js";

const PAGE_SIZE = 20; // jobs per page (the API's default; at most MAX_LIMIT)
const MAX_LIMIT = 100;
const POLL_MS = 2000;
const PROMPT_CHARS = 60;
const KINDS = { generation: "generation", forward: "forward", reverse: "reverse", guidance_sweep: "guidance sweep" };

const isLive = (job) => !TERMINAL.has(job.status);
const clip = (text, n) => (text.length > n ? `${text.slice(0, n - 1).trimEnd()}…` : text);
const clock = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
const full = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "long" });

function promptOf(job) {
  const prompt = job.params?.prompt || "";
  if (prompt) return prompt;
  return job.params?.has_image ? "(a picture)" : "—";
}

function stepOf(job) {
  const { step, total } = job.progress || {};
  return Number.isFinite(step) && Number.isFinite(total) ? `${step} / ${total}` : "—";
}

/** One job's row: made once, then updated in place as the job changes. */
class JobRow {
  constructor(job, { onCancel }) {
    this.id = job.id;
    this.status = null;
    this.thumbURL = null;
    this.img = el("img", { alt: "", hidden: true });
    this.prompt = el("th", { scope: "row", class: "job-prompt" });
    this.kind = el("td");
    this.badge = el("span", { class: "job-status" });
    this.error = el("span", { class: "job-error", hidden: true });
    this.model = el("td");
    this.step = el("td", { class: "num" });
    this.created = el("time");
    this.cancel = el("button", { type: "button", class: "quiet", text: "Cancel" });
    this.cancel.addEventListener("click", () => onCancel(this));
    this.tr = el(
      "tr",
      { "data-job-id": job.id },
      el("td", { class: "job-thumb" }, el("span", { class: "thumb" }, this.img)),
      this.prompt,
      this.kind,
      el("td", {}, this.badge, this.error),
      this.model,
      this.step,
      el("td", {}, this.created),
      el("td", {}, this.cancel),
    );
  }

  /** Returns true when the job's status changed since the last update. */
  update(job) {
    const set = (node, text) => {
      if (node.textContent !== text) node.textContent = text;
    };
    const prompt = promptOf(job);
    set(this.prompt, clip(prompt, PROMPT_CHARS));
    this.prompt.title = prompt;
    set(this.kind, KINDS[job.kind] || job.kind);
    set(this.badge, job.status);
    this.badge.dataset.status = job.status;
    this.tr.dataset.status = job.status;
    const message = job.status === "failed" ? job.error?.message || "unknown error" : "";
    set(this.error, message);
    this.error.hidden = !message;
    set(this.model, job.model || job.params?.model || "—");
    set(this.step, stepOf(job));
    const created = new Date(job.created_at * 1000);
    this.created.dateTime = created.toISOString();
    this.created.title = full.format(created);
    set(this.created, clock.format(created));
    const live = isLive(job);
    if (this.cancel.hidden === live) {
      if (!live && document.activeElement === this.cancel) $("#jobs-scroll").focus(); // keep the keyboard's place
      this.cancel.hidden = !live;
      this.cancel.disabled = false;
    }
    this.cancel.setAttribute("aria-label", `Cancel ${KINDS[job.kind] || job.kind}: ${clip(prompt, PROMPT_CHARS)}`);
    const changed = this.status !== null && this.status !== job.status;
    this.status = job.status;
    if (job.kind === "generation" && job.status === "succeeded" && job.images?.length && !this.thumbURL) {
      this.thumbnail(job);
    }
    return changed;
  }

  /** Image 0 behind the key, as a blob URL (revoked in drop()). */
  async thumbnail(job) {
    this.thumbURL = "pending";
    try {
      const url = URL.createObjectURL(await fetchBlob(job.images[0]));
      if (this.thumbURL !== "pending") return URL.revokeObjectURL(url); // dropped meanwhile
      this.thumbURL = url;
      this.img.src = url;
      this.img.alt = `Image 1 of ${job.images.length}: ${job.params?.prompt || ""}`;
      this.img.hidden = false;
    } catch (error) {
      this.thumbURL = error.status ? "failed" : null; // refused (expired): not again; a network error: next update
    }
  }

  drop() {
    if (this.thumbURL?.startsWith("blob:")) URL.revokeObjectURL(this.thumbURL);
    this.thumbURL = "dropped";
    this.tr.remove();
  }
}

export function initJobs() {
  const form = $("#jobs-form");
  const filter = $("#jobs-status");
  const tbody = $("#jobs-rows");
  const more = $("#jobs-more");
  const summary = $("#jobs-summary");
  const announcer = $("#jobs-announce");
  const rows = new Map(); // job id -> JobRow
  let jobs = []; // as listed, newest first
  let after = null; // next_starting_after of the last page loaded
  let inflight = null; // AbortController of the request in progress
  let timer = null;

  const announce = (text) => {
    announcer.textContent = text;
  };

  const showSummary = () => {
    const live = jobs.filter(isLive).length;
    const what = filter.value ? `${filter.value === "queued,running" ? "live" : filter.value} ` : "";
    const n = jobs.length;
    let text = n ? `${n} ${what}job${n === 1 ? "" : "s"}` : `No ${what}jobs in the last hour.`;
    if (live) text += ` · ${live} queued or running, updated every ${POLL_MS / 1000} s`;
    summary.textContent = text;
  };

  /** Rows in the jobs' order: new rows made, gone ones dropped, kept ones moved only when out of place. */
  const render = () => {
    const ids = new Set(jobs.map((job) => job.id));
    for (const [id, row] of rows) {
      if (!ids.has(id)) {
        row.drop();
        rows.delete(id);
      }
    }
    const ended = [];
    jobs.forEach((job, i) => {
      let row = rows.get(job.id);
      if (!row) {
        row = new JobRow(job, { onCancel: cancel });
        rows.set(job.id, row);
      }
      if (row.update(job) && TERMINAL.has(job.status)) ended.push(job);
      if (tbody.children[i] !== row.tr) tbody.insertBefore(row.tr, tbody.children[i] || null);
    });
    more.hidden = !after;
    showSummary();
    if (ended.length === 1) announce(`${KINDS[ended[0].kind]} "${clip(promptOf(ended[0]), 40)}" ${ended[0].status}.`);
    else if (ended.length > 1) announce(`${ended.length} jobs ended.`);
  };

  const schedule = () => {
    clearTimeout(timer);
    timer = null;
    if (document.visibilityState === "visible" && jobs.some(isLive)) timer = setTimeout(() => load("poll"), POLL_MS);
  };

  /**
   * mode: "reload" (the first page again, as many jobs as are shown so rows loaded with Older jobs keep
   * updating), "reset" (the first page only: the filter changed), "poll" (a reload that yields to any request
   * in progress), "more" (the next page, appended).
   */
  async function load(mode) {
    if (mode === "poll" && inflight) return; // that request schedules the next poll
    inflight?.abort();
    const controller = new AbortController();
    inflight = controller;
    clearTimeout(timer);
    const query = new URLSearchParams();
    const shown = Math.min(MAX_LIMIT, Math.max(PAGE_SIZE, jobs.length));
    query.set("limit", String(mode === "reload" || mode === "poll" ? shown : PAGE_SIZE));
    if (filter.value) query.set("status", filter.value);
    if (mode === "more") query.set("starting_after", after);
    if (mode !== "poll") clearErrors(form);
    if (mode === "more") more.disabled = true;
    try {
      const page = await request(`v1/jobs?${query}`, { signal: controller.signal });
      if (mode === "more") {
        const seen = new Set(jobs.map((job) => job.id));
        jobs = jobs.concat(page.jobs.filter((job) => !seen.has(job.id)));
        announce(`${page.jobs.length} older job${page.jobs.length === 1 ? "" : "s"} loaded.`);
      } else jobs = page.jobs;
      after = page.has_more ? page.next_starting_after : null;
      render();
    } catch (error) {
      if (controller.signal.aborted) return; // a newer request took over
      if (error.status === 401) {
        jobs = []; // the key went: so do its jobs (main.js reloads once a key is given)
        after = null;
        render();
        summary.textContent = "Needs an API key.";
      } else showError(form, error);
    } finally {
      if (inflight === controller) {
        inflight = null;
        more.disabled = false;
        schedule();
      }
    }
  }

  async function cancel(row) {
    row.cancel.disabled = true;
    clearErrors(form);
    try {
      await request(`v1/jobs/${encodeURIComponent(row.id)}/cancel`, { method: "POST" });
    } catch (error) {
      row.cancel.disabled = false;
      if (error.status !== 409) showError(form, error); // 409: it had already ended
    }
    await load("reload");
  }

  /** Forget the listed jobs (another key's may come next). */
  function clear() {
    inflight?.abort();
    inflight = null;
    clearTimeout(timer);
    more.disabled = false;
    jobs = [];
    after = null;
    render();
    summary.textContent = "Needs an API key.";
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    load("reload");
  });
  filter.addEventListener("change", () => {
    jobs = [];
    after = null;
    render(); // rows of the other statuses go at once
    summary.textContent = "Loading…";
    load("reset");
  });
  more.addEventListener("click", () => load("more"));
  document.addEventListener("latentd:submitted", () => load("reload"));
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") load("reload");
    else clearTimeout(timer); // hidden: no polling until it is seen again
  });

  load("reset");
  return { reload: () => load("reload"), clear };
}
