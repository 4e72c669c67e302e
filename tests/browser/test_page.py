"""The page at /, driven in Chromium against the real stack (Redis, a worker on the default model, the gateway
with API keys). Jobs are kept small: a few steps on the 64x64 model."""

from __future__ import annotations

import io
import re

import httpx
from PIL import Image
from playwright.sync_api import Page, expect

from tests.browser.conftest import ARTIFACTS, give_key, wait_done
from tests.conftest import API_KEYS

RECORD_GENERATION = """() => {
  window.__seen = [];
  window.__shift = 0;
  const note = (what) => (record) => record.target.getAttribute("src") && window.__seen.push(what);
  new MutationObserver((records) => records.forEach(note("preview")))
    .observe(document.querySelector("#gen-preview"), { attributes: true, attributeFilter: ["src"] });
  new MutationObserver((records) => records.forEach(note("image")))
    .observe(document.querySelector("#gen-images"), { attributes: true, attributeFilter: ["src"], subtree: true });
  new PerformanceObserver((list) => {
    for (const entry of list.getEntries()) if (!entry.hadRecentInput) window.__shift += entry.value;
  }).observe({ type: "layout-shift" });
}"""


def number(page: Page, selector: str) -> float:
    return float(page.inner_text(selector))


def test_the_page_asks_for_a_key_then_shows_the_status_strip(page, real_stack):
    page.goto(real_stack.url + "/")
    give_key(page, "not-a-key")
    expect(page.locator("#key-error")).to_have_text("invalid API key")
    expect(page.locator("#key-dialog")).to_be_visible()
    give_key(page, API_KEYS[1])
    expect(page.locator("#key-dialog")).to_be_hidden()
    expect(page.locator("#status-ready")).to_have_text("ready")
    expect(page.locator("#status-models")).to_have_text(real_stack.model)
    expect(page.locator("#status-workers")).to_have_text(re.compile(r"^[1-9]\d*$"))
    expect(page.locator("#status-queue")).not_to_have_text("…")
    expect(page.locator("#gen-model option")).to_have_text([re.compile(re.escape(real_stack.model))])
    assert page.evaluate("sessionStorage.getItem('latentd.apiKey')") == API_KEYS[1]
    assert page.evaluate("localStorage.length") == 0
    page.click("#key-forget")
    expect(page.locator("#key-dialog")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('latentd.apiKey')") is None


def test_a_generation_shows_previews_before_the_image_without_layout_shift(opened):
    page = opened
    page.fill("#gen-steps", "12")
    page.fill("#gen-preview-every", "1")
    page.fill("#gen-seed", "5")
    page.evaluate(RECORD_GENERATION)
    page.click("#gen-submit")
    wait_done(page, "gen")
    expect(page.locator("#gen-images img")).to_be_visible()

    seen = page.evaluate("window.__seen")
    assert "preview" in seen and "image" in seen, seen
    assert seen.index("preview") < seen.index("image"), f"the final image came before any preview: {seen}"
    assert seen.count("preview") >= 3, seen
    assert page.evaluate("window.__shift") < 0.01, "the layout moved while the job streamed in"

    size = page.evaluate("document.querySelector('#gen-images img').naturalWidth")
    assert size == 64
    link = page.locator("#gen-images a[download]")
    expect(link).to_have_text("Download image 1")
    assert link.get_attribute("href").startswith("blob:")
    params = page.locator("#gen-params")
    expect(params).to_contain_text("seed5")
    expect(params).to_contain_text("steps12")
    expect(params).to_contain_text("statussucceeded")
    assert re.search(r"run time\d+\.\d+ s", params.text_content())


def test_a_running_generation_can_be_cancelled(opened):
    page = opened
    page.fill("#gen-steps", "400")
    page.fill("#gen-preview-every", "0")
    page.click("#gen-submit")
    expect(page.locator("#gen-status")).to_have_text(re.compile(r"^Step ([2-9]|\d\d+) of 400"))
    expect(page.locator("#gen-cancel")).to_be_enabled()
    page.click("#gen-cancel")
    expect(page.locator("#gen-status")).to_have_text(re.compile(r"^Cancelled at step \d+ of 400"))
    expect(page.locator("#gen-params")).to_contain_text("statuscancelled")
    expect(page.locator("#gen-images img")).to_be_hidden()
    expect(page.locator("#gen-submit")).to_be_enabled()


def halves_png(width: int = 64, height: int = 64) -> bytes:
    """Red on the left, blue on the right."""
    picture = Image.new("RGB", (width, height), (230, 30, 30))
    picture.paste((30, 60, 220), (width // 2, 0, width, height))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_generation_can_start_from_a_picture_and_inpaint_under_a_mask(opened):
    """Image to image from an uploaded picture (its size is the size; 12 steps at strength 0.5 run 6), then the
    same with a mask; a mask of another size is named at its field."""
    page = opened
    page.fill("#gen-steps", "12")
    page.fill("#gen-preview-every", "0")
    page.set_input_files("#gen-image", files=[{"name": "halves.png", "mimeType": "image/png", "buffer": halves_png()}])
    page.fill("#gen-strength", "0.5")
    page.click("#gen-submit")
    wait_done(page, "gen")
    params = page.locator("#gen-params")
    expect(params).to_contain_text("strength0.5")
    expect(params).to_contain_text("size64 × 64")
    expect(page.locator("#gen-images img")).to_be_visible()

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    page.set_input_files(
        "#gen-mask", files=[{"name": "mask.png", "mimeType": "image/png", "buffer": buffer.getvalue()}]
    )
    page.click("#gen-submit")
    wait_done(page, "gen")
    expect(params).to_contain_text("strength0.5, masked")

    small = io.BytesIO()
    mask.resize((32, 32)).save(small, format="PNG")
    page.set_input_files(
        "#gen-mask", files=[{"name": "small.png", "mimeType": "image/png", "buffer": small.getvalue()}]
    )
    page.click("#gen-submit")
    expect(page.locator("#gen-mask-error")).to_have_text("mask must be the image's size (64x64), got 32x32")
    page.set_input_files("#gen-mask", files=[])
    page.set_input_files("#gen-image", files=[])
    page.fill("#gen-strength", "")


def test_the_forward_slider_changes_the_frame_and_the_alpha_bar_readout(opened):
    page = opened
    page.check("#fwd-src-upload")
    page.set_input_files("#fwd-image", files=[{"name": "halves.png", "mimeType": "image/png", "buffer": halves_png()}])
    page.select_option("#fwd-stride", "50")
    page.click("#fwd-submit")
    wait_done(page, "fwd")
    slider = page.locator("#fwd-t")
    expect(slider).to_be_enabled()
    assert slider.get_attribute("max") == "20"  # t = 0, 50, ..., 1000

    expect(page.locator("#fwd-t-value")).to_have_text("0")
    expect(page.locator("#fwd-abar")).to_have_text("1.0000")
    expect(page.locator("#fwd-sqrt-abar")).to_have_text("1.0000")
    expect(page.locator("#fwd-sqrt-noise")).to_have_text("0.0000")
    untouched = page.locator("#fwd-frame").get_attribute("src")

    slider.focus()
    page.keyboard.press("End")
    expect(page.locator("#fwd-t-value")).to_have_text("1000")
    assert number(page, "#fwd-abar") < 0.01
    assert number(page, "#fwd-sqrt-noise") > 0.99
    noise = page.locator("#fwd-frame").get_attribute("src")
    assert noise != untouched

    page.keyboard.press("ArrowLeft")
    expect(page.locator("#fwd-t-value")).to_have_text("950")
    expect(slider).to_have_attribute("aria-valuetext", re.compile(r"^t = 950, ᾱ_t = 0\.\d{4}$"))
    abar = number(page, "#fwd-abar")
    assert abs(number(page, "#fwd-sqrt-abar") - abar**0.5) < 1e-3
    assert abs(number(page, "#fwd-sqrt-noise") - (1 - abar) ** 0.5) < 1e-3
    assert page.locator("#fwd-frame").get_attribute("src") not in (untouched, noise)
    expect(page.locator("#fwd-caption")).to_contain_text("pixel space")


def denoise_watching_frames(page) -> list[str]:
    """Submit the Reverse panel and wait for its job; the status line at each x_t frame shown meanwhile."""
    page.evaluate(
        """() => {
          window.__live = [];
          new MutationObserver(() => window.__live.push(document.querySelector("#rev-status").textContent))
            .observe(document.querySelector("#rev-xt"), { attributes: true, attributeFilter: ["src"] });
        }"""
    )
    page.click("#rev-submit")
    wait_done(page, "rev")
    return page.evaluate("window.__live")


def test_reverse_frames_arrive_live_and_playback_advances(opened):
    page = opened
    page.fill("#rev-steps", "12")
    live = denoise_watching_frames(page)
    assert live and live[0].startswith("Step "), f"no frame was shown while the job ran: {live[:3]}"
    scrub = page.locator("#rev-scrub")
    expect(scrub).to_have_attribute("max", "11")
    expect(page.locator("#rev-pos")).to_have_text(re.compile(r"^12 of 12 · t = \d+$"))
    expect(page.locator("#rev-x0")).to_be_visible()

    scrub.focus()
    page.keyboard.press("Home")
    expect(page.locator("#rev-pos")).to_have_text("1 of 12 · t = 999")
    page.evaluate(
        """() => {
          window.__positions = [];
          new MutationObserver(() => window.__positions.push(document.querySelector("#rev-pos").textContent))
            .observe(document.querySelector("#rev-pos"), { childList: true, characterData: true, subtree: true });
        }"""
    )
    page.click("#rev-play")
    expect(page.locator("#rev-play")).to_have_text("Play")  # back to Play: it reached the end
    expect(page.locator("#rev-pos")).to_have_text(re.compile(r"^12 of 12 · t = \d+$"))
    steps = [int(text.split(" of ")[0]) for text in page.evaluate("window.__positions")]
    assert steps == sorted(steps) and len(set(steps)) >= 10, steps

    page.focus("#rev-play")
    page.keyboard.press("Space")  # at the end of a finished job, play starts over
    expect(page.locator("#rev-play")).to_have_text("Pause")
    page.keyboard.press("Space")
    expect(page.locator("#rev-play")).to_have_text("Play")


HALVES_OF_SHOWN_XT = """() => {
  const img = document.querySelector("#rev-xt");
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(img, 0, 0);
  const half = (x0) => {
    const { data } = context.getImageData(x0, 0, canvas.width / 2, canvas.height);
    const sum = [0, 0, 0];
    for (let i = 0; i < data.length; i += 4) for (let c = 0; c < 3; c += 1) sum[c] += data[i + c];
    return sum.map((v) => v / (data.length / 4));
  };
  return [half(0), half(canvas.width / 2)];
}"""


def test_a_reverse_trajectory_can_start_from_a_picture(opened):
    """12 steps at strength 0.5 run the last 6 (the step events' total): the scrubber and the readout count 6,
    the frames take the picture's shape (64 x 32), and the first x_t is the picture under noise, not noise alone.
    A strength out of range is named at its field."""
    page = opened
    page.fill("#rev-steps", "12")
    page.set_input_files(
        "#rev-image", files=[{"name": "halves.png", "mimeType": "image/png", "buffer": halves_png(64, 32)}]
    )
    page.fill("#rev-strength", "0.5")
    live = denoise_watching_frames(page)
    assert live and re.match(r"^Step \d of 6 ", live[0]), f"no frame was shown while the job ran: {live[:3]}"
    scrub = page.locator("#rev-scrub")
    expect(scrub).to_have_attribute("max", "5")
    expect(page.locator("#rev-pos")).to_have_text(re.compile(r"^6 of 6 · t = \d+$"))
    expect(page.locator("#rev-x0")).to_be_visible()
    ratios = page.evaluate(
        "['#rev-xt', '#rev-x0'].map((s) => document.querySelector(s).parentElement.style.aspectRatio)"
    )
    assert ratios == ["64 / 32"] * 2, ratios
    assert page.evaluate(
        "[document.querySelector('#rev-xt').naturalWidth, document.querySelector('#rev-xt').naturalHeight]"
    ) == [64, 32]

    scrub.focus()
    page.keyboard.press("Home")
    pos = page.locator("#rev-pos")
    expect(pos).to_have_text(re.compile(r"^1 of 6 · t = \d+$"))
    start = int(pos.inner_text().rsplit("= ", 1)[1])
    assert 300 <= start <= 700, f"strength 0.5 starts half way down, not at t = {start}"
    expect(page.locator("#rev-xt")).to_have_attribute("alt", re.compile(r"^x_t at step 1 of 6, t = \d+$"))
    left, right = page.evaluate(HALVES_OF_SHOWN_XT)
    print("first x_t, mean RGB of the left and right halves:", left, right)
    # the upload is red on the left, blue on the right: its noised start keeps that, noise alone would not
    assert left[0] - left[2] > right[0] - right[2] + 40, (left, right)

    page.fill("#rev-strength", "2")
    page.click("#rev-submit")
    error = page.locator("#rev-strength-error")
    expect(error).to_contain_text("strength")
    expect(error).to_contain_text("between 0 and 1")
    expect(page.locator("#rev-strength")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#rev-strength")).to_be_focused()
    expect(page.locator("#rev-status")).to_have_text(re.compile(r"^Not started"))
    page.set_input_files("#rev-image", files=[])
    page.fill("#rev-strength", "")


def test_the_guidance_sweep_shows_five_labelled_pictures(opened):
    page = opened
    page.fill("#sweep-steps", "8")
    page.click("#sweep-submit")
    wait_done(page, "sweep")
    pictures = page.locator("#sweep-grid img")
    expect(pictures).to_have_count(5)
    for index in range(5):
        expect(pictures.nth(index)).to_be_visible()
    assert page.evaluate("[...document.querySelectorAll('#sweep-grid img')].map((i) => i.naturalWidth)") == [64] * 5
    expect(page.locator("#sweep-grid .regime")).to_have_text(
        [
            "scale 0 · prompt ignored",
            "scale 1 · plain conditional",
            "scale 3 · balanced",
            "scale 7.5 · balanced",
            "scale 15 · over-saturated",
        ]
    )
    words = page.locator("#sweep-grid .words")
    expect(words.nth(0)).to_contain_text("When scale=0, the prompt is ignored.")
    expect(words.nth(1)).to_contain_text("When scale=1, you get standard conditional generation.")
    expect(words.nth(3)).to_contain_text("7.5 is the default for Stable Diffusion.")
    expect(words.nth(4)).to_contain_text("'fried' look")
    expect(pictures.nth(4)).to_have_attribute("alt", re.compile(r"at guidance scale 15: over-saturated$"))


def test_a_bad_input_shows_the_error_next_to_its_field(opened, real_stack):
    page = opened
    page.fill("#gen-steps", "0")
    page.click("#gen-submit")
    error = page.locator("#gen-steps-error")
    expect(error).to_have_text("num_inference_steps must be between 1 and 1000, got 0")
    expect(page.locator("#gen-steps")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#gen-steps")).to_have_attribute("aria-describedby", re.compile(r"gen-steps-error"))
    expect(page.locator("#gen-steps")).to_be_focused()
    assert page.locator("#gen-steps").evaluate(
        "(el) => el.closest('.field').contains(document.querySelector('#gen-steps-error'))"
    )

    page.fill("#gen-steps", "5")
    page.fill("#gen-prompt", "a small red circle " * 10)
    page.click("#gen-submit")
    expect(page.locator("#gen-prompt-error")).to_contain_text("prompt is")
    expect(page.locator("#gen-prompt-error")).to_contain_text("tokens long")
    expect(page.locator("#gen-steps-error")).to_have_count(0)
    expect(page.locator("#gen-steps")).not_to_have_attribute("aria-invalid", "true")

    # the sampler menu lists what the model supports; the guidance fields show the model's defaults they fall
    # back to; a rescale out of range is named at its field
    assert "dpmpp_2m" in page.locator("#gen-sampler option").all_inner_texts()
    model = httpx.get(real_stack.url + "/v1/models", headers=real_stack.headers()).json()["data"][0]
    for field, key in (("rescale", "rescale"), ("guidance-start", "start"), ("guidance-stop", "stop")):
        expected = f"{model[f'default_guidance_{key}']:g} (model default)"
        expect(page.locator(f"#gen-{field}")).to_have_attribute("placeholder", expected)
    strength = f"{model['default_strength']:g}; masked {model['default_inpaint_strength']:g} (model default)"
    for panel in ("gen", "rev"):
        expect(page.locator(f"#{panel}-strength")).to_have_attribute("placeholder", strength)
    page.fill("#gen-prompt", "a small red circle")
    page.fill("#gen-rescale", "2")
    page.click("#gen-submit")
    expect(page.locator("#gen-rescale-error")).to_have_text("guidance_rescale must be between 0 and 1, got 2")
    page.fill("#gen-rescale", "")
    # so is a guidance interval that ends before it starts
    page.fill("#gen-guidance-start", "0.8")
    page.fill("#gen-guidance-stop", "0.2")
    page.click("#gen-submit")
    expect(page.locator("#gen-guidance-stop-error")).to_have_text(
        "guidance_stop must be between guidance_start (0.8) and 1, got 0.2"
    )
    page.fill("#gen-guidance-start", "")
    page.fill("#gen-guidance-stop", "")

    page.check("#fwd-src-upload")
    page.click("#fwd-submit")
    expect(page.locator("#fwd-image-error")).to_have_text("a forward trajectory needs an image or a prompt")

    page.fill("#sweep-seed", "-1")
    page.click("#sweep-submit")
    expect(page.locator("#sweep-seed-error")).to_contain_text("seed must be between 0 and")
    expect(page.locator("#gen-status")).to_have_text(re.compile(r"^Not started"))


def test_the_page_loads_with_nothing_but_the_gateway_reachable(opened, traffic):
    page = opened
    assert traffic.requested and not traffic.blocked
    assert all(url.startswith(traffic.origin + "/") for url in traffic.requested)
    loaded = {url.removeprefix(traffic.origin) for url in traffic.requested}
    assert {"/", "/web/style.css", "/web/js/main.js", "/v1/models", "/readyz"} <= loaded
    # the stylesheet applied, with the system's fonts (no web font was asked for)
    assert page.evaluate("getComputedStyle(document.querySelector('.panel')).borderTopLeftRadius") == "8px"
    assert "system-ui" in page.evaluate("getComputedStyle(document.body).fontFamily")
    assert page.evaluate("document.fonts.size") == 0


def test_the_page_is_labelled_keyboard_ready_and_fits_375_px(opened):
    page = opened
    page.set_viewport_size({"width": 375, "height": 812})
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll("input, select, textarea, button, progress")]
            .filter((el) => !(el.labels?.length || el.getAttribute("aria-label") || el.textContent.trim()))
            .map((el) => el.id || el.outerHTML)"""
    )
    assert unlabelled == []
    page.reload()  # the key survives a reload (sessionStorage): no dialog, focus starts at the top
    expect(page.locator("#status-models")).not_to_have_text("…")
    expect(page.locator("#key-dialog")).to_be_hidden()
    page.keyboard.press("Tab")  # the skip link first, with a visible focus ring
    assert page.evaluate("document.activeElement.className") == "skip"
    ring = page.evaluate(
        "(() => { const s = getComputedStyle(document.activeElement); return [s.outlineStyle, s.outlineWidth]; })()"
    )
    assert ring == ["solid", "3px"]
    for _ in range(8):  # keep tabbing: every stop shows its focus
        page.keyboard.press("Tab")
        assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") == "solid"
    page.screenshot(path=str(ARTIFACTS / "page-375px.png"), full_page=False)


def test_a_person_does_all_four_things_on_one_page(opened):
    """Generate, noise that picture (dragging the slider with the mouse), denoise, sweep: the README's picture."""
    page = opened
    page.fill("#gen-steps", "20")
    page.fill("#gen-seed", "2")
    page.click("#gen-submit")
    wait_done(page, "gen")

    page.check("#fwd-src-generated")
    expect(page.locator("#fwd-prompt")).to_be_hidden()
    page.click("#fwd-submit")
    wait_done(page, "fwd")
    slider = page.locator("#fwd-t")
    expect(slider).to_be_enabled()
    box = slider.bounding_box()
    page.mouse.move(box["x"] + 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] / 2, steps=8)
    page.mouse.up()
    t = int(page.inner_text("#fwd-t-value"))
    assert 200 <= t <= 600, t
    assert 0 < number(page, "#fwd-abar") < 1

    page.fill("#rev-steps", "20")
    page.click("#rev-submit")
    wait_done(page, "rev")
    page.locator("#rev-scrub").focus()
    page.keyboard.press("Home")
    for _ in range(5):
        page.keyboard.press("ArrowRight")
    expect(page.locator("#rev-pos")).to_have_text(re.compile(r"^6 of 20 · t = \d+$"))

    page.fill("#sweep-steps", "12")
    page.click("#sweep-submit")
    wait_done(page, "sweep")
    expect(page.locator("#sweep-grid img:visible")).to_have_count(5)
    page.locator("#generate").scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "page.png"), full_page=True)
