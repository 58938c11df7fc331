"""app.py in a real browser (Debian chromium driven by playwright): upload -> Start -> the loss plot draws
points -> Stop -> a sample streams in. Prints the two timings the UI is judged by (app start-up to first page,
Start to first loss point on screen) for the default settings."""
import shutil
import time

import pytest

from test_app import start_app, stop_app

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]
pytestmark = pytest.mark.skipif(not shutil.which(CHROMIUM), reason="needs Debian's chromium (apt install chromium)")

# the loss plot's lines (vega-lite SVG; legend symbols excluded) have drawn at least one point
LOSS_POINTS = """() => Array.from(document.querySelectorAll('#nf-loss .mark-line path'))
    .some(p => (p.getAttribute('d') || '').startsWith('M'))"""


TRAIN_VERTICES = "document.querySelector('#nf-loss .mark-line path').getAttribute('d').split('L').length"


def textarea(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} textarea").input_value()


def test_click_through(tmp_path, tiny_text):
    corpus = tmp_path / "notes.txt"
    corpus.write_text(tiny_text[:20000], encoding="utf-8")
    runs = tmp_path / "runs"
    t0 = time.time()
    proc, url = start_app(runs, tmp_path / "app.log")
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000}, locale="en-US")
            errors = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.wait_for_selector("#nf-files")
            startup = time.time() - t0

            # Data: upload a file
            page.set_input_files("#nf-files input[type=file]", str(corpus))
            page.wait_for_function(
                "() => document.querySelector('#nf-upload-msg textarea').value.includes('✓ notes.txt')")
            assert "1 file(s)" in page.locator("#nf-data-summary").inner_text()

            # Train with the page's defaults; the command box shows what runs
            page.get_by_role("tab", name="2 · Train").click()
            page.wait_for_function("() => document.querySelector('#nf-command textarea').value.includes('notes.txt')")
            command = textarea(page, "nf-command")
            assert command.startswith("python train.py --data ") and "--threads" in command
            page.locator("#nf-start").click()
            t_start = time.time()
            page.wait_for_function(LOSS_POINTS, timeout=60_000)
            first_point = time.time() - t_start
            page.wait_for_function("() => document.querySelector('#nf-progress').innerText.includes('tokens/s')")
            assert "running" in page.locator("#nf-progress").inner_text()

            page.locator("#nf-stop").click()
            page.wait_for_function("() => document.querySelector('#nf-status').innerText.includes('Stopped')",
                                   timeout=60_000)
            assert "train.py" in textarea(page, "nf-log")
            # the plot ends with every logged point of the run (one line vertex per metrics.jsonl row)
            rows = len(next(runs.glob("*/metrics.jsonl")).read_text().splitlines())
            page.wait_for_function(f"() => {TRAIN_VERTICES} === {rows}")
            page.screenshot(path=str(tmp_path / "train.png"), full_page=True)

            # Sample the stopped run: the text streams into the output box
            page.get_by_role("tab", name="3 · Sample").click()
            page.wait_for_function("() => document.querySelector('#nf-model input').value.startsWith('notes-')")
            page.locator("#nf-generate").click()
            page.wait_for_function("() => document.querySelector('#nf-output textarea').value.length > 40",
                                   timeout=60_000)
            assert textarea(page, "nf-output").startswith("ROMEO:")
            page.screenshot(path=str(tmp_path / "sample.png"), full_page=True)

            # Runs: select the run; the Share box shows the hub.py command it would run, the token field is masked
            page.get_by_role("tab", name="Runs").click()
            page.locator("#nf-runs [data-testid=cell-0-0]").click()
            page.wait_for_function("() => document.querySelector('#nf-selected input').value.startsWith('notes-')")
            page.get_by_text("Share on the Hugging Face Hub").click()
            page.locator("#nf-repo textarea, #nf-repo input").first.fill("me/notes-gpt")
            page.wait_for_function(
                "() => document.querySelector('#nf-hub-cmd textarea').value.includes('me/notes-gpt')")
            assert textarea(page, "nf-hub-cmd").startswith("python hub.py ")
            assert page.locator("#nf-token input").get_attribute("type") == "password"
            page.wait_for_function("() => !document.querySelector('#nf-push').disabled")
            page.screenshot(path=str(tmp_path / "runs.png"), full_page=True)

            # The page follows the browser's language
            zh = browser.new_page(locale="zh-CN")
            zh.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            zh.goto(url)
            zh.wait_for_selector("#nf-files")
            zh.get_by_role("tab", name="2 · 训练").click()
            assert "开始训练" in zh.locator("#nf-start").inner_text()
            zh.wait_for_function("() => document.querySelector('#nf-hardware').innerText.includes('CPU（') || "
                                 "document.querySelector('#nf-hardware').innerText.includes('GPU：')")
            zh.screenshot(path=str(tmp_path / "zh.png"), full_page=True)
            browser.close()
        assert not errors, errors
        print(f"\napp start-up to first page: {startup:.1f} s; Start to first loss point on screen: "
              f"{first_point:.1f} s (screenshots in {tmp_path})")
    finally:
        stop_app(proc, runs)
