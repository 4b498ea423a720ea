"""End to end in a real browser (Playwright on the system Chromium): generate, Stop keeps the
finished images, a duplicate upload is named, an uploaded adapter and its edits survive a restart,
PNG info → Compose reproduces an image pixel for pixel. Screenshots go to test-output/browser/."""

from __future__ import annotations

import importlib.util
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

from studio import Studio  # noqa: E402
from studio.adapters.formats import write_adapter  # noqa: E402
from studio.app import AppHandlers  # noqa: E402

from conftest import random_lora  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHOTS = REPO / "test-output" / "browser"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no system chromium (apt-get install chromium)"),
    pytest.mark.slow,
]


def _app_module():
    spec = importlib.util.spec_from_file_location("studio_app_browser", REPO / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _serve(pipe, out: Path, library: Path):
    """A fresh Studio and app over the same outputs and library folders: what a restart gives."""
    app = _app_module()
    studio = Studio.from_pipeline(pipe, "tiny-sd1")
    adapter = random_lora(studio, "a", seed=1, scale=0.5)
    adapter.trigger = "sksa"
    studio.adapters.add(adapter)
    handlers = AppHandlers(studio, out, library_dir=library, batch_size=1)  # images appear one by one
    startup = handlers.open_library()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    demo = app.build_app(studio, handlers, startup)
    demo.queue(max_size=16, default_concurrency_limit=1)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **app.launch_options(handlers, "2mb"))
    return demo, handlers


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def _page(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(60_000)
    page.goto(url)
    page.wait_for_selector("#prompt textarea")
    return page


def _field(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input:not([type=range]):not([type=file])").first


def _set(page, elem_id: str, value) -> None:
    field = _field(page, elem_id)
    field.fill(str(value))
    field.press("Tab")


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=False)


def _open_row(page, name: str) -> None:
    """Click the Library table's cell holding ``name`` (opens the adapter in the edit form)."""
    page.wait_for_function(f"document.querySelector('#library_table').innerText.includes('{name}')")
    page.locator("#library_table").get_by_text(name, exact=True).filter(visible=True).first.click()


def test_generate_stop_and_png_info_round_trip(sd1_pipe, tmp_path, browser):
    demo, handlers = _serve(sd1_pipe, tmp_path / "out", tmp_path / "library")
    try:
        page = _page(browser, demo.local_url)
        # generate one image
        _set(page, "prompt", "a red circle sksa <lora:a:0.8>")
        _set(page, "seed", 7)
        _set(page, "steps", 6)
        page.click("#generate")
        page.wait_for_function("document.querySelector('#status').innerText.includes('Done')")
        assert page.locator("#gallery img").count() >= 1
        _shot(page, "1-generated")
        original = max((tmp_path / "out").rglob("*-7.png"), key=lambda p: p.stat().st_mtime)

        # Stop mid-batch: the finished images stay, the status says so (Ctrl+Enter generates, Esc stops)
        _set(page, "steps", 150)
        _set(page, "batch", 6)
        page.locator("#prompt textarea").press("Control+Enter")
        page.wait_for_function("document.querySelector('#status').innerText.includes('image 2/6')")
        page.keyboard.press("Escape")
        page.wait_for_function("document.querySelector('#status').innerText.includes('Stopped')")
        kept = page.locator("#gallery .thumbnail-item, #gallery button img").count()
        status = page.locator("#status").inner_text()
        _shot(page, "2-stopped")
        assert "kept" in status and "Stopping" not in status, status
        assert kept >= 1

        # PNG info -> Send to Compose -> Generate reproduces the first image pixel for pixel
        _tab(page, "PNG info")
        page.locator("#png_file input[type=file]").set_input_files(str(original))
        page.wait_for_selector("text=Studio recipe found")
        _shot(page, "3-pnginfo")
        page.click("#send_to_compose")
        page.wait_for_function("document.querySelector('#prompt textarea').value.includes('<lora:a:0.8>')")
        assert _field(page, "seed").input_value() == "7"
        before = set((tmp_path / "out").rglob("*.png"))
        page.click("#generate")
        page.wait_for_function("document.querySelector('#status').innerText.includes('Done')")
        new = [p for p in (tmp_path / "out").rglob("*-7.png") if p not in before]
        assert len(new) == 1
        with Image.open(original) as a, Image.open(new[0]) as b:
            assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))
        _shot(page, "4-reproduced")
        page.close()
    finally:
        demo.close()


def test_upload_duplicate_edit_and_restart(sd1_pipe, tmp_path, browser):
    studio = Studio.from_pipeline(sd1_pipe, "tiny-sd1")
    src = write_adapter(random_lora(studio, "mine", seed=5), tmp_path / "mine.safetensors")
    demo, _ = _serve(sd1_pipe, tmp_path / "out", tmp_path / "library")
    try:
        page = _page(browser, demo.local_url)
        _tab(page, "Library")
        for name in ("mine", "twin"):
            if name == "twin":  # a fresh form: the file input is replaced by the uploaded file's row
                page.reload()
                page.wait_for_selector("#prompt textarea")
                _tab(page, "Library")
            _set(page, "upload_name", name)
            page.locator("#upload_file input[type=file]").set_input_files(str(src))
            page.wait_for_timeout(500)
            page.click("#upload")
            page.wait_for_function(f"document.querySelector('#lib_status').innerText.includes('{name}')")
        assert "Duplicate" in page.locator("#lib_status").inner_text()
        page.locator("#library_table").scroll_into_view_if_needed()
        _shot(page, "5-duplicate")
        _open_row(page, "mine")
        page.wait_for_function(  # the form is filled from the clicked row
            "document.querySelector('#edit_trigger textarea, #edit_trigger input').value === 'mine'")
        _set(page, "edit_trigger", "zzq")
        page.click("#save_meta")
        page.wait_for_selector("text=Saved metadata of")
        page.close()
    finally:
        demo.close()

    demo, handlers = _serve(sd1_pipe, tmp_path / "out", tmp_path / "library")  # a restart
    try:
        assert handlers.studio.adapters.get("mine").trigger == "zzq"
        page = _page(browser, demo.local_url)
        assert "3 adapter(s)" in page.locator(".prose").first.inner_text()  # a, mine, twin
        _tab(page, "Library")
        _open_row(page, "mine")
        page.wait_for_function(
            "document.querySelector('#edit_trigger textarea, #edit_trigger input').value === 'zzq'")
        _shot(page, "6-after-restart")
        page.close()
    finally:
        demo.close()
