"""The page's Your jobs panel (GET /v1/jobs), in Chromium against the real stack: a job submitted from a panel
shows up and finishes with its thumbnail, a running job outlives a reload and is cancelled from its row, and
Older jobs pages on. The stack is shared with the other browser tests, so the key may have other jobs listed:
rows are found by their job id."""

from __future__ import annotations

import re
import time

import httpx
from playwright.sync_api import Page, expect

from tests.browser.conftest import wait_done

LIST = re.compile(r"/v1/jobs\?")
LIVE_ROWS = '#jobs-rows tr[data-status="queued"], #jobs-rows tr[data-status="running"]'
LONG_PROMPT = "a large purple triangle on a gray background" + " background" * 4  # 88 characters, 14 tokens


def submitted(client: httpx.Client, body: dict) -> str:
    """The id of a job submitted through the API; a 429 (the key's share of the queue held by cancelled jobs that
    have not reached their next step yet: the worker may be slow on a loaded machine) is waited out."""
    deadline = time.monotonic() + 60
    while (answer := client.post("/v1/generations", json=body)).status_code == 429 and time.monotonic() < deadline:
        time.sleep(float(answer.headers.get("retry-after", 1)) / 4)
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def row(page: Page, job_id: str):
    return page.locator(f'#jobs-rows tr[data-job-id="{job_id}"]')


def lists_fetched_within(page: Page, ms: int) -> list[str]:
    """The GET /v1/jobs the page starts in the next `ms`, as the page's own resource timing counts them."""
    page.evaluate("() => { performance.clearResourceTimings(); window.__since = performance.now(); }")
    page.wait_for_timeout(ms)
    return page.evaluate(
        """() => performance.getEntriesByType("resource")
          .filter((e) => e.startTime >= window.__since && e.name.includes("/v1/jobs?")).map((e) => e.name)"""
    )


def test_a_generation_from_the_panel_is_listed_and_succeeds_with_a_thumbnail(opened):
    page = opened
    page.fill("#gen-prompt", "a large red circle on a white background")
    page.fill("#gen-steps", "12")
    page.fill("#gen-preview-every", "0")
    with page.expect_response(lambda r: r.url.endswith("/v1/generations") and r.request.method == "POST") as sent:
        page.click("#gen-submit")
    job_id = sent.value.json()["id"]
    job = row(page, job_id)
    expect(job).to_be_visible()  # listed on the panel's submit, not at the next manual refresh
    expect(page.locator("#jobs-rows tr").first).to_have_attribute("data-job-id", job_id)  # newest first
    wait_done(page, "gen")

    expect(job.locator(".job-status")).to_have_text("succeeded")
    expect(job.locator("td").nth(1)).to_have_text("generation")
    expect(job.locator("th")).to_have_text("a large red circle on a white background")
    expect(job.locator("td.num")).to_have_text("12 / 12")
    expect(job.locator("time")).to_have_text(re.compile(r"\d"))
    expect(job.get_by_role("button", name=re.compile("^Cancel"))).to_be_hidden()
    thumb = job.locator("img")
    expect(thumb).to_be_visible()
    expect(thumb).to_have_attribute("src", re.compile(r"^blob:"))
    expect(thumb).to_have_attribute("alt", "Image 1 of 1: a large red circle on a white background")
    assert thumb.evaluate("(img) => img.naturalWidth") == 64


def test_a_running_job_is_listed_after_a_reload_and_cancelled_from_its_row(opened, real_stack):
    page = opened
    job_id = httpx.post(
        real_stack.url + "/v1/generations",
        headers=real_stack.headers(),
        json={"prompt": LONG_PROMPT, "num_inference_steps": 1000, "preview_every": 0},
    ).json()["id"]
    page.reload()  # the key survives in sessionStorage; the job is found again in the list
    job = row(page, job_id)
    status = job.locator(".job-status")
    expect(status).to_have_text("running")
    prompt = job.locator("th")
    expect(prompt).to_have_text(LONG_PROMPT[:59].rstrip() + "…")  # cut to 60 characters
    expect(prompt).to_have_attribute("title", LONG_PROMPT)  # the whole of it
    expect(page.locator("#jobs-summary")).to_contain_text("updated every 2 s")
    step = job.locator("td.num")
    expect(step).to_have_text(re.compile(r"^\d+ / 1000$"))
    first = step.inner_text()
    expect(step).not_to_have_text(first)  # the list polls while a job runs

    # a hidden tab does not poll; seen again, it reloads at once
    page.evaluate(
        """() => {
          Object.defineProperty(document, "visibilityState", { configurable: true, get: () => "hidden" });
          document.dispatchEvent(new Event("visibilitychange"));
        }"""
    )
    assert (polls := lists_fetched_within(page, 2500)) == [], f"polled while hidden: {polls}"
    with page.expect_request(LIST):
        page.evaluate(
            """() => {
              delete document.visibilityState;
              document.dispatchEvent(new Event("visibilitychange"));
            }"""
        )

    cancel = job.get_by_role("button", name=re.compile("^Cancel generation: a large purple triangle"))
    expect(cancel).to_be_visible()
    cancel.click()
    expect(status).to_have_text("cancelled")
    expect(cancel).to_be_hidden()
    assert httpx.get(f"{real_stack.url}/v1/jobs/{job_id}", headers=real_stack.headers()).json()["status"] == (
        "cancelled"
    )
    # no job left running: polling stops
    expect(page.locator(LIVE_ROWS)).to_have_count(0)
    expect(page.locator("#jobs-summary")).not_to_contain_text("updated every")
    assert (polls := lists_fetched_within(page, 2500)) == [], f"polled with nothing running: {polls}"


def test_older_jobs_brings_the_next_page_and_the_filter_narrows_the_list(opened, real_stack):
    """21 jobs submitted and cancelled at once through the API (so they cost the worker nothing and never run
    into the per-key queue limit): the first page shows the newest 20, Older jobs the 21st."""
    page = opened
    ids = []
    with httpx.Client(base_url=real_stack.url, headers=real_stack.headers()) as client:
        for i in range(21):
            body = {"prompt": f"a gray square number {i}", "num_inference_steps": 1000, "preview_every": 0}
            ids.append(submitted(client, body))
            assert client.post(f"/v1/jobs/{ids[-1]}/cancel").status_code == 200
    page.click("#jobs-refresh")
    rows = page.locator("#jobs-rows tr")
    expect(rows).to_have_count(20)
    expect(rows.first).to_have_attribute("data-job-id", ids[-1])
    assert rows.evaluate_all("(rows) => rows.map((r) => r.dataset.jobId)") == ids[:0:-1]
    expect(row(page, ids[0])).to_have_count(0)

    more = page.get_by_role("button", name="Older jobs")
    expect(more).to_be_visible()
    more.click()
    expect(row(page, ids[0])).to_be_visible()
    expect(rows.nth(20)).to_have_attribute("data-job-id", ids[0])
    expect(page.locator("#jobs-announce")).to_have_text(re.compile(r"^\d+ older jobs? loaded\.$"))
    expect(page.locator(LIVE_ROWS)).to_have_count(0)  # a cancelled running job ends at its next step: polled

    page.select_option("#jobs-status", "cancelled")
    expect(rows.first).to_have_attribute("data-job-id", ids[-1])
    expect(page.locator('#jobs-rows tr:not([data-status="cancelled"])')).to_have_count(0)
    expect(page.locator("#jobs-summary")).to_have_text(re.compile(r"^\d+ cancelled jobs?$"))
    page.select_option("#jobs-status", "succeeded")
    expect(row(page, ids[-1])).to_have_count(0)
    expect(page.locator('#jobs-rows tr:not([data-status="succeeded"])')).to_have_count(0)
