"""/docs (Swagger UI) and /redoc render from files installed with the gateway, with every other host cut off."""

from __future__ import annotations

from playwright.sync_api import expect


def test_swagger_ui_renders_the_operations_offline(page, real_stack, traffic):
    page.goto(real_stack.url + "/docs")
    operations = page.locator(".opblock-summary-path")
    expect(operations.first).to_be_visible()
    paths = operations.all_inner_texts()
    assert {"/v1/generations", "/v1/trajectories", "/v1/jobs/{job_id}/events", "/v1/models"} <= {
        p.replace("\u200b", "") for p in paths
    }
    assert traffic.requested and not traffic.blocked
    assert f"{real_stack.url}/docs-assets/swagger-ui-bundle.js" in traffic.requested


def test_redoc_renders_the_operations_offline(page, real_stack, traffic):
    page.goto(real_stack.url + "/redoc")
    operations = page.locator("[data-section-id^='operation/']")
    expect(operations.first).to_be_attached()
    assert operations.count() >= 10
    expect(page.locator("h2", has_text="Create Generation")).to_be_visible()
    assert not traffic.blocked  # Redoc's vendor logo is refused by the page's CSP before any request
    assert f"{real_stack.url}/docs-assets/redoc.standalone.js" in traffic.requested
