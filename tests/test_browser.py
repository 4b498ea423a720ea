"""End to end in a real browser (Playwright on the system Chromium): generate, Stop keeps the
finished images, a duplicate upload is named, an uploaded adapter and its edits survive a restart,
PNG info → Compose reproduces an image pixel for pixel, two adapters composed from their cards,
training 20 steps with the attention loss (refused until its masks are uploaded) and using the
result, an X/Y grid sent from the history, the method suggested for two demo objects. Every run is tiny (64 px, 2–6 steps). Screenshots go
to test-output/browser/."""

from __future__ import annotations

import contextlib

import importlib.util
import json
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

from studio import Studio  # noqa: E402
from studio.adapters.formats import write_adapter  # noqa: E402
from studio.app import AppHandlers  # noqa: E402
from studio.metadata import RECIPE_KEY, read_recipe  # noqa: E402
from studio.resources import demo_adapters_dir  # noqa: E402

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


def _serve(pipe, out: Path, library: Path, demo_dir: Path | None = None):
    """A fresh Studio and app over the same outputs and library folders: what a restart gives. With
    ``demo_dir``, the bundled toy model (``pipe`` unused) and the demo adapters in that folder."""
    app = _app_module()
    if demo_dir is None:
        studio = Studio.from_pipeline(pipe, "tiny-sd1")
        for i, name in enumerate(("a", "b")):
            adapter = random_lora(studio, name, seed=i + 1, scale=0.5)
            adapter.trigger = f"sks{name}"
            studio.adapters.add(adapter)
    else:
        studio = Studio.load()
    handlers = AppHandlers(studio, out, library_dir=library, demo_dir=demo_dir, batch_size=1)  # images one by one
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


@contextlib.contextmanager
def _served(pipe, tmp_path: Path, browser, demo_dir: Path | None = None):
    """The app (output and library under tmp_path) with one browser page on it; both closed after."""
    demo, handlers = _serve(pipe, tmp_path / "out", tmp_path / "library", demo_dir)
    try:
        page = _page(browser, demo.local_url)
        yield page, handlers
        page.close()
    finally:
        demo.close()


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


def _open_card(page, name: str) -> None:
    """Click the Library card of ``name`` (opens the adapter in the edit form)."""
    _tab(page, "Library")
    _click_until(page, f'[id="card-{name}"]',
                 f"document.querySelector('#edit_title').innerText.startsWith('{name}')")


def _click_until(page, selector: str, condition: str, attempts: int = 3) -> None:
    """Click until the JS ``condition`` holds. Card clicks go through one stable event (see
    ``card_click_js`` in app.py), but a click can still land on a card that a re-render is replacing
    (the library changed) and do nothing; a user would simply click again."""
    for attempt in range(attempts):
        page.click(selector)
        try:
            page.wait_for_function(condition, timeout=20_000)
            return
        except sync_api.TimeoutError:
            if attempt == attempts - 1:
                raise


def _wait_text(page, elem_id: str, text: str, timeout_ms: int = 60_000) -> None:
    """Wait until ``#elem_id`` shows ``text``; on a timeout, a screenshot and what it showed instead."""
    try:
        page.wait_for_function(f"document.querySelector('#{elem_id}')?.innerText.includes({text!r})",
                               timeout=timeout_ms)
    except sync_api.TimeoutError:
        _shot(page, f"failed-{elem_id}")
        shown = page.locator(f"#{elem_id}").inner_text() if page.locator(f"#{elem_id}").count() else "(absent)"
        raise AssertionError(f"#{elem_id} never showed {text!r}; it shows {shown!r}") from None


def _choose(page, elem_id: str, option: str) -> None:
    """Pick an option of a Gradio dropdown."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def test_generate_stop_and_png_info_round_trip(sd1_pipe, tmp_path, browser):
    with _served(sd1_pipe, tmp_path, browser) as (page, handlers):
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
        info = page.locator("#info").inner_text()  # the info line describes the kept images, not the last run
        assert re.search(r"\b[1-5] of 6 image\(s\) kept \(stopped\)", info), info

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


def test_upload_duplicate_edit_delete_and_restart(sd1_pipe, tmp_path, browser):
    studio = Studio.from_pipeline(sd1_pipe, "tiny-sd1")
    src = write_adapter(random_lora(studio, "mine", seed=5), tmp_path / "mine.safetensors")
    with _served(sd1_pipe, tmp_path, browser) as (page, _):
        _wait_text(page, "header", "2 adapter(s)")  # a, b
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
            _wait_text(page, "lib_status", name)
            page.wait_for_selector(f'[id="card-{name}"]')  # its card appears without a reload
        assert "Duplicate" in page.locator("#lib_status").inner_text()
        _wait_text(page, "header", "4 adapter(s)")  # the header's count follows
        _shot(page, "5-duplicate")

        _open_card(page, "mine")  # a click on a card fills the edit form
        page.wait_for_function(
            "document.querySelector('#edit_trigger textarea, #edit_trigger input').value === 'mine'")
        _set(page, "edit_trigger", "zzq")
        _set(page, "edit_phrase", "a zzq shape")
        page.click("#save_meta")
        page.wait_for_selector("text=Saved metadata of")
        _wait_text(page, "card-mine", "a zzq shape")  # the card redraws with the new phrase
        _tab(page, "Compose")
        _wait_text(page, "insert-mine", "insert")
        _click_until(page, '[id="insert-mine"]',  # the Compose cards know the edit too
                     "document.querySelector('#prompt textarea').value === 'a zzq shape <lora:mine:1>'")

        _open_card(page, "twin")  # delete asks first, then moves the files to the trash
        page.once("dialog", lambda d: d.dismiss())
        page.click("#delete_adapter")
        _wait_text(page, "lib_status", "Nothing deleted")
        page.once("dialog", lambda d: d.accept())
        page.click("#delete_adapter")
        _wait_text(page, "lib_status", "Deleted")
        page.wait_for_selector('[id="card-twin"]', state="detached")
        _wait_text(page, "header", "3 adapter(s)")
        assert list((tmp_path / "library" / ".trash").rglob("twin.safetensors"))
        page.evaluate("window.scrollTo(0, 0)")
        _shot(page, "6-edited")

    with _served(sd1_pipe, tmp_path, browser) as (page, handlers):  # a restart
        assert handlers.studio.adapters.get("mine").trigger == "zzq"
        _wait_text(page, "header", "3 adapter(s)")  # a, b, mine
        _open_card(page, "mine")
        page.wait_for_function(
            "document.querySelector('#edit_trigger textarea, #edit_trigger input').value === 'zzq'")
        _shot(page, "7-after-restart")


def test_compose_two_adapters_from_the_cards_and_set_a_preview(sd1_pipe, tmp_path, browser):
    with _served(sd1_pipe, tmp_path, browser) as (page, _):
        _set(page, "prompt", "a red circle")
        for name in ("a", "b"):
            page.click(f'[id="insert-{name}"]')
            page.wait_for_function(f"document.querySelector('#prompt textarea').value.includes('<lora:{name}:1>')")
        prompt = _field(page, "prompt").input_value()
        assert prompt.startswith("a red circle") and "sksa" in prompt and "sksb" in prompt, prompt
        page.get_by_text("b weight").wait_for()  # one weight slider per adapter in the prompt
        # picking a method moves the CFG slider to that method's default on this model, and says so
        _set(page, "cfg", 2)
        _choose(page, "method", "composite")
        page.wait_for_function("document.querySelector('#cfg input[type=number]').value === '7.5'")
        _wait_text(page, "method_info", "sets CFG to 7.5")
        _choose(page, "method", "merge")
        _set(page, "seed", 3)
        _set(page, "steps", 3)
        _set(page, "batch", 2)
        page.click("#generate")
        _wait_text(page, "status", "Done")
        page.wait_for_function("document.querySelectorAll('#gallery img').length >= 2")
        info = page.locator("#info").inner_text()
        assert "adapters a 1, b 1" in info, info
        page.get_by_text("Composer report").click()
        report = "".join(page.locator("#report").inner_text().split())
        assert '"adapters":{"a":1,"b":1}' in report, report

        # "set preview from this image": select a gallery image, pick the adapter, set it
        page.locator("#gallery img").first.click()
        page.wait_for_function("document.querySelector('#picked img') !== null")
        _choose(page, "preview_for", "a")
        page.click("#set_preview")
        _wait_text(page, "history_status", "Preview of a set")
        _shot(page, "8-composed")
        _tab(page, "Library")
        page.wait_for_selector('[id="card-a"] img')  # the card shows it without a reload
        assert page.locator('[id="card-b"] img').count() == 0
        _shot(page, "9-library-cards")


def test_suggested_method_for_two_demo_objects_is_one_click_and_runs(tmp_path, browser):
    """Toy model, demo adapters: two objects from their cards bring the suggestion of step-5 CLoRA;
    its button sets the method, the step_size field to 5 and CFG 7.5, and the image's recipe carries them."""
    with _served(None, tmp_path, browser, demo_adapters_dir()) as (page, _):
        for name in ("crescent-lora", "plus-lora"):
            page.click(f'[id="insert-{name}"]')
            page.wait_for_function(f"document.querySelector('#prompt textarea').value.includes('<lora:{name}:1>')")
        _wait_text(page, "method_hint", "Suggested for object + object: clora, step_size 5")
        page.click("#use_pick")
        _wait_text(page, "method_hint", "✓ clora, step_size 5")
        assert page.locator("#method input").input_value() == "clora"
        page.wait_for_function("document.querySelector('#cfg input[type=number]').value === '7.5'")
        page.get_by_text("Method parameters").click()
        page.wait_for_function("[...document.querySelectorAll('label')].some(l => l.innerText.trim() === "
                               "'step_size' && l.parentElement.querySelector('input').value === '5')")
        _set(page, "seed", 11)
        _set(page, "steps", 4)
        page.click("#generate")
        _wait_text(page, "status", "Done")
        _shot(page, "10-suggested-method")
        images = [p for p in (tmp_path / "out").rglob("*.png") if RECIPE_KEY in Image.open(p).info]  # not the maps
        assert len(images) == 1, images
        recipe = read_recipe(images[0])
        assert recipe.method == "clora" and recipe.method_params["step_size"] == 5.0, recipe
        assert recipe.guidance == 7.5 and recipe.seed == 11, recipe


def _instance_images(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, colour in enumerate(((200, 30, 30), (30, 160, 40), (40, 60, 200))):
        image = Image.new("RGB", (64, 64), (245, 245, 240))
        image.paste(colour, (16 + 4 * i, 16, 44 + 4 * i, 48))
        paths.append(str(folder / f"shape{i}.png"))
        image.save(paths[-1])
    return paths


def _concept_masks(folder: Path) -> list[str]:
    """Each instance image's mask (white on its square), under the image's name."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(3):
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (16 + 4 * i, 16, 44 + 4 * i, 48))
        paths.append(str(folder / f"shape{i}.png"))
        mask.save(paths[-1])
    return paths


def test_train_20_steps_and_use_the_result(sd1_pipe, tmp_path, browser):
    with _served(sd1_pipe, tmp_path, browser) as (page, handlers):
        _tab(page, "Train")
        page.locator("#train_files input[type=file]").set_input_files(_instance_images(tmp_path / "imgs"))
        page.get_by_text("shape2.png").first.wait_for()  # thumbnails of the uploads
        _set(page, "train_class", "shape")  # the tiny random base has no class word of its own
        _set(page, "train_steps", 20)
        _set(page, "train_rank", 2)
        _set(page, "train_name", "mine")
        prior = page.get_by_label("Prior preservation")  # the stand-in prior is prior images: it ticks the box
        page.locator("#train_stand_in input").check()
        for _ in range(100):
            if prior.is_checked():
                break
            page.wait_for_timeout(100)
        assert prior.is_checked()
        page.locator("#train_stand_in input").uncheck()  # a 20-step run with the attention loss from here on
        prior.uncheck()
        _set(page, "train_attention", 0.1)
        page.click("#train_btn")  # no masks yet: refused, naming the fix
        _wait_text(page, "train_status", "needs a concept mask per instance image")
        page.locator("#train_masks input[type=file]").set_input_files(_concept_masks(tmp_path / "masks"))
        _wait_text(page, "train_masks", "shape2")  # the uploaded list
        page.click("#train_btn")
        _wait_text(page, "train_status", "Trained", timeout_ms=300_000)  # ~1 s a step, more on a busy machine
        assert "20 steps" in page.locator("#train_status").inner_text()
        _shot(page, "10-trained")
        assert (tmp_path / "library" / "mine.safetensors").is_file()
        with safe_open(str(tmp_path / "library" / "mine.safetensors"), "pt") as f:
            assert json.loads(f.metadata()["training_params"])["attention_loss"] == 0.1
        _wait_text(page, "header", "3 adapter(s)")
        _open_card(page, "mine")  # in the library, with the phrase it was taught
        assert page.locator("#edit_phrase textarea, #edit_phrase input").first.input_value() == "a sks shape"
        _tab(page, "Compose")
        _click_until(page, '[id="insert-mine"]',
                     "document.querySelector('#prompt textarea').value === 'a sks shape <lora:mine:1>'")
        _set(page, "steps", 2)
        page.click("#generate")
        _wait_text(page, "status", "Done")
        assert "adapters mine 1" in page.locator("#info").inner_text()


def test_xy_grid_sent_from_the_history(sd1_pipe, tmp_path, browser):
    with _served(sd1_pipe, tmp_path, browser) as (page, _):
        _set(page, "prompt", "a red circle sksa <lora:a:0.8>")
        _set(page, "seed", 5)
        _set(page, "steps", 2)
        page.click("#generate")
        _wait_text(page, "status", "Done")
        page.wait_for_selector("#history img")
        page.locator("#history img").first.click()  # an earlier run: its recipe goes to X/Y
        page.wait_for_function("document.querySelector('#picked img') !== null")
        page.click("#to_xy")
        page.wait_for_function("document.querySelector('#x_values textarea, #x_values input')?.value === '5, 6, 7, 8'")
        assert page.get_by_role("tab", name="X/Y grid").get_attribute("aria-selected") == "true"
        page.click("#xy_btn")
        _wait_text(page, "xy_info", "4 cells")
        page.wait_for_selector("#xy_grid img")
        _shot(page, "11-xy-grid")
