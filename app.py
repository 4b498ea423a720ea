"""LoRA Composition Studio, the Gradio app: layout and event wiring only.

Every action is an ``AppHandlers`` method over one shared ``Studio`` (studio/app/, one module per tab).
Run ``python app.py`` (or ``make run`` / ``studio serve``); it binds 127.0.0.1:7860 by default.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gradio as gr  # noqa: E402

from studio.app import (  # noqa: E402
    CONCEPT_KINDS, SAMPLER_CHOICES, XY_AXES, AppHandlers, card_label, params_shown, prompt_weights, seed_axis_from,
    set_tag_weight,
)
from studio.errors import StudioError  # noqa: E402
from studio.resources import demo_adapters_dir  # noqa: E402
from studio.studio import Studio  # noqa: E402

REPO = Path(__file__).resolve().parent
CSS = """
.card {border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 6px;}
.note {color: #b45309; font-weight: 600;}
/* small images stay small and crisp: thumbnails at most 192 px, no blurry upscaling */
#gallery .thumbnail-item, #history .thumbnail-item, #xy_cells .thumbnail-item {max-width: 192px; max-height: 192px;}
#gallery img, #history img, #xy_cells img, #picked img, #edit_preview img {image-rendering: pixelated;}
/* the X/Y grid fills its box (small cells scaled up by whole pixels, big grids scaled down) */
#xy_grid img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated;}
/* the Library: a grid of cards, each a button (preview, name, kind · type, trigger phrase) */
#library_cards {display: grid !important; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 10px;}
.lib-card {flex-direction: column !important; justify-content: flex-start !important; white-space: pre-line;
  height: 100%; padding: 8px !important; line-height: 1.35; font-weight: 400 !important;}
.lib-card img {width: 128px !important; height: 128px !important; max-height: none !important; margin: 0 auto 6px !important;
  border-radius: 6px; object-fit: cover; image-rendering: pixelated;}
.lib-card:not(:has(img))::before {content: "no preview"; display: flex; align-items: center; justify-content: center;
  width: 128px; height: 128px; margin: 0 auto 6px; border-radius: 6px; border: 1px dashed var(--border-color-primary);
  color: var(--body-text-color-subdued); font-size: 12px;}
"""
GPU = dict(concurrency_id="gpu", concurrency_limit=1)  # generate / merge share one GPU queue
LIGHT = dict(concurrency_limit=None)


def card_click_js(verb: str, name: str) -> str:
    """Browser-side click of a drawn card: writes "verb|name|nonce" into the stable card_action box
    (the nonce makes a second click on the same card a change too)."""
    return f"() => {json.dumps(f'{verb}|{name}|')} + Date.now()"


def build_app(studio: Studio, handlers: AppHandlers | None = None, startup: list[str] | None = None) -> gr.Blocks:
    """The Blocks app around this Studio (tests pass a tiny one)."""
    h = handlers or AppHandlers(studio)
    size = studio.default_size
    train_defaults = h.train_defaults()
    with gr.Blocks(title="LoRA Composition Studio") as demo:
        header = gr.Markdown(h.header(), elem_id="header")
        if studio.note:
            gr.Markdown(f"⚠ {studio.note}", elem_classes=["note"])
        if startup:
            with gr.Accordion("Start-up log", open=False):
                gr.Markdown("\n".join(f"- {m}" for m in startup))
        lib_rev = gr.State(0)  # bumped when the library changes: header, cards and lists redraw
        last_seed = gr.State(None)
        png_fields = gr.State({})
        picked = gr.State(None)  # the gallery or history image this user selected last
        fields_rev = gr.State(0)  # bumped after the method's parameters change: their fields redraw
        stop_ack = gr.Textbox(visible=False)  # what /stop answers; the run itself writes its status line
        # Cards drawn by gr.render send their clicks here in the browser ("verb|name|nonce"): one event
        # that a re-render never replaces, so a click racing a redraw still reaches the server.
        card_action = gr.Textbox(visible="hidden", elem_id="card_action")

        with gr.Tabs() as tabs:
            # ---- Compose ----------------------------------------------------------------
            with gr.Tab("Compose", id="compose"):
                with gr.Row():
                    with gr.Column(scale=3):
                        prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt",
                                            placeholder="a red circle <lora:name:0.8>  (insert an adapter below)")
                        negative = gr.Textbox(label="Negative prompt", lines=1)
                        with gr.Row():
                            generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")

                        @gr.render(inputs=prompt, triggers=[prompt.change, demo.load])
                        def _weights(text):
                            tags = prompt_weights(text)
                            if not tags:
                                return
                            with gr.Row():
                                for name, weight in tags:
                                    slider = gr.Slider(0, 2, value=weight, step=0.05, label=f"{name} weight",
                                                       min_width=140)
                                    slider.release(lambda p, w, n=name: set_tag_weight(p, n, w), [prompt, slider],
                                                   prompt, api_visibility="private", **LIGHT)
                        with gr.Row():
                            method = gr.Dropdown(h.methods(), value="merge", label="Composition method", elem_id="method")
                            sampler = gr.Dropdown(SAMPLER_CHOICES, value="ddim", label="Sampler")
                        with gr.Row(equal_height=True):
                            method_hint = gr.Markdown(elem_id="method_hint")
                            use_pick = gr.Button("Use the suggested method", size="sm", visible=False, scale=0,
                                                 min_width=160, elem_id="use_pick")
                        method_info = gr.Markdown(h.method_help("merge"), elem_id="method_info")
                        with gr.Row():
                            seed = gr.Number(-1, precision=0, label="Seed (−1 = random)", min_width=120, elem_id="seed")
                            reuse = gr.Button("♻ last seed", size="sm", min_width=80)
                            batch = gr.Slider(1, 16, value=1, step=1, label="Batch count", elem_id="batch")
                        with gr.Row():
                            steps = gr.Slider(1, 150, value=25, step=1, label="Steps", elem_id="steps")
                            guidance = gr.Slider(0, 30, value=studio.default_guidance, step=0.5, label="CFG scale", elem_id="cfg")
                        with gr.Row():
                            width = gr.Slider(64, 2048, value=size, step=8, label="Width")
                            height = gr.Slider(64, 2048, value=size, step=8, label="Height")
                        with gr.Accordion("Method parameters", open=False):
                            params = gr.Code(h.method_params("merge"), language="json",
                                             label="Advanced: all parameters as JSON")

                            # redrawn once params holds the method's JSON (fields_rev), so the fields show it
                            @gr.render(inputs=[method, params], triggers=[fields_rev.change, demo.load])
                            def _param_fields(name, params_json):
                                defaults = json.loads(h.method_params(name))
                                current = field_values(params_json, defaults)
                                with gr.Row():
                                    for key, default in defaults.items():
                                        if isinstance(default, bool):
                                            field = gr.Checkbox(current[key], label=key, min_width=120)
                                        elif isinstance(default, (int, float)):
                                            field = gr.Number(current[key], label=key, min_width=120)
                                        else:
                                            field = gr.Textbox("" if current[key] is None else str(current[key]),
                                                               label=key, min_width=160)
                                        field.change(lambda j, v, k=key, d=default: set_param(j, k, v, d),
                                                     [params, field], params, api_visibility="private", **LIGHT)
                        with gr.Accordion("Adapters: insert a trigger phrase and tag, or open one", open=True):
                            with gr.Row():
                                card_search = gr.Textbox(label="Search", placeholder="name, phrase, concept", scale=3)
                                card_kind = gr.Dropdown(list(CONCEPT_KINDS), value="", label="Kind", scale=1)

                            @gr.render(inputs=[card_search, card_kind],
                                       triggers=[demo.load, lib_rev.change, card_search.submit, card_kind.change])
                            def _cards(search, kind):
                                cards = h.adapter_cards(search, kind)
                                if not cards:
                                    gr.Markdown("No adapters match: upload one in the Library tab.")
                                with gr.Row(equal_height=True):
                                    for c in cards:
                                        with gr.Column(min_width=150, elem_classes=["card"]):
                                            if c["preview"]:
                                                gr.Image(c["preview"], show_label=False, height=80, buttons=[],
                                                         interactive=False, container=False)
                                            gr.Markdown(f"**{c['name']}** · {c['kind'] or '?'} · {c['type']}  \n"
                                                        f"“{c['phrase'] or c['trigger'] or '—'}” · w {c['weight']:g}")
                                            with gr.Row():
                                                ins = gr.Button("insert", size="sm", min_width=60, elem_id=f"insert-{c['name']}")
                                                opn = gr.Button("edit", size="sm", min_width=60)
                                            ins.click(None, None, card_action, js=card_click_js("insert", c["name"]))
                                            opn.click(None, None, card_action, js=card_click_js("open", c["name"]))
                    with gr.Column(scale=4):
                        status = gr.Markdown(elem_id="status")
                        gallery = gr.Gallery(label="Images (PNG with metadata)", format="png", type="filepath",
                                             columns=4, height=280, object_fit="contain", elem_id="gallery",
                                             buttons=["download", "fullscreen"], interactive=False)
                        with gr.Row():
                            preview = gr.Image(label="Step preview", height=128, width=128, interactive=False,
                                               buttons=[], scale=0, min_width=140)
                            info = gr.Markdown(elem_id="info")
                        with gr.Column(elem_classes=["card"]):
                            with gr.Row(equal_height=True):
                                picked_view = gr.Image(label="Selected", height=96, width=96, interactive=False,
                                                       buttons=[], scale=0, min_width=104, elem_id="picked")
                                with gr.Column():
                                    gr.Markdown("**Selected image** (click one in Images or History)")
                                    with gr.Row():
                                        to_compose = gr.Button("Send to Compose", size="sm", elem_id="to_compose")
                                        to_pnginfo = gr.Button("PNG info", size="sm", elem_id="to_pnginfo")
                                        to_xy = gr.Button("Send to X/Y", size="sm", elem_id="to_xy")
                                    with gr.Row(equal_height=True):
                                        preview_for = gr.Dropdown(h.adapter_names(), value=None, show_label=False,
                                                                  container=False, min_width=120, elem_id="preview_for",
                                                                  scale=2)
                                        set_preview = gr.Button("Set as this adapter's preview", size="sm",
                                                                elem_id="set_preview", scale=1)
                            history_status = gr.Markdown(elem_id="history_status")
                        extras = gr.Gallery(label="Masks and attention maps (methods that report them)",
                                            format="png", type="filepath", columns=4, height=160, interactive=False)
                        with gr.Accordion("Composer report", open=False):
                            report = gr.JSON(label="report", elem_id="report")
                        with gr.Accordion("History: earlier runs", open=True):
                            history = gr.Gallery(h.history.items(), label="History", format="png", type="filepath",
                                                 columns=8, height=200, interactive=False, elem_id="history")

            # ---- Library ----------------------------------------------------------------
            with gr.Tab("Library", id="library"):
                lib_status = gr.Markdown(elem_id="lib_status")
                # the opened adapter (placed in the edit form below; the card grid reads it first)
                edit_name = gr.Dropdown(h.adapter_names(), label="Adapter", value=None, elem_id="edit_name", render=False)
                with gr.Row():
                    with gr.Column(scale=3):
                        with gr.Row():
                            lib_search = gr.Textbox(label="Search", placeholder="name, phrase, concept", scale=3,
                                                    elem_id="lib_search")
                            lib_kind = gr.Dropdown(list(CONCEPT_KINDS), value="", label="Kind", scale=1,
                                                   elem_id="lib_kind")

                        @gr.render(inputs=[lib_search, lib_kind, edit_name],
                                   triggers=[demo.load, lib_rev.change, lib_search.change, lib_kind.change,
                                             edit_name.change])
                        def _library_cards(search, kind, opened):
                            cards = h.adapter_cards(search, kind)
                            gr.Markdown(h.library_summary(len(cards)) + " · click a card to open it",
                                        elem_id="lib_count")
                            with gr.Row(elem_id="library_cards"):
                                for c in cards:  # the opened adapter's card is highlighted
                                    card = gr.Button(card_label(c), icon=c["preview"], elem_classes=["lib-card"],
                                                     variant="primary" if c["name"] == opened else "secondary",
                                                     min_width=150, elem_id=f"card-{c['name']}")
                                    card.click(None, None, card_action, js=card_click_js("open", c["name"]))
                    with gr.Column(scale=2, elem_classes=["card"]):
                        edit_title = gr.Markdown(h.adapter_details(None), elem_id="edit_title")
                        edit_name.render()
                        with gr.Row():
                            edit_preview = gr.Image(label="Preview (drop an image to replace it)", type="filepath",
                                                    height=160, width=160, sources=["upload"], buttons=[],
                                                    elem_id="edit_preview", min_width=160)
                            with gr.Column():
                                edit_trigger = gr.Textbox(label="Trigger word", elem_id="edit_trigger")
                                edit_phrase = gr.Textbox(label="Trigger phrase (what insert writes)",
                                                         elem_id="edit_phrase")
                                use_picked = gr.Button("Use the selected Compose image as preview", size="sm")
                        with gr.Row():
                            edit_concept = gr.Textbox(label="Concept (class word)", elem_id="edit_concept")
                            edit_kind = gr.Dropdown(list(CONCEPT_KINDS), value="", label="Kind", elem_id="edit_kind")
                            edit_weight = gr.Number(1.0, label="Preferred weight", elem_id="edit_weight")
                        with gr.Row():
                            save_btn = gr.Button("Save", variant="primary", elem_id="save_meta")
                            delete_btn = gr.Button("Delete (to trash)", variant="stop", elem_id="delete_adapter")
                with gr.Row():
                    with gr.Column():
                        gr.Markdown("### Upload")
                        upload_file = gr.File(label=".safetensors adapter", file_types=[".safetensors"], type="filepath",
                                              elem_id="upload_file")
                        upload_name = gr.Textbox(label="Name (optional; sanitised)", elem_id="upload_name")
                        upload_btn = gr.Button("Add to library", variant="primary", elem_id="upload")
                    with gr.Column():
                        gr.Markdown("### Merge")
                        if h.merge_available():
                            merge_names = gr.Dropdown(h.adapter_names(), multiselect=True, label="Adapters to merge")
                            merge_method = gr.Dropdown(h.merge_methods(), value="lego", label="Merge method")
                            gr.Markdown("`lego` (magnitude mean) *averages* its sources; `cat` and runtime "
                                        "multi-adapter *sum* them. `cat` takes no rank.")
                            merge_rank = gr.Number(None, precision=0, label="Rank (empty = method default)")
                            merge_new = gr.Textbox(label="New adapter name")
                            merge_btn = gr.Button("Merge into a new adapter")
                        else:
                            merge_names = None
                            gr.Markdown(h.availability("studio.adapters.merge", "Merging"))

            # ---- PNG info ---------------------------------------------------------------
            with gr.Tab("PNG info", id="pnginfo"):
                with gr.Row():
                    with gr.Column():
                        png_file = gr.File(label="Drop a PNG (kept byte for byte, so its metadata survives)",
                                           file_types=[".png", ".jpg", ".jpeg", ".webp"], type="filepath",
                                           elem_id="png_file")
                        png_image = gr.Image(type="filepath", interactive=False, label="Image", buttons=[], height=256)
                    with gr.Column():
                        png_status = gr.Markdown()
                        png_text = gr.Textbox(label="parameters (A1111 infotext)", lines=6, buttons=["copy"])
                        png_recipe = gr.JSON(label="lora_studio recipe")
                        send_btn = gr.Button("Send to Compose", variant="primary", elem_id="send_to_compose")

            # ---- X/Y grid ---------------------------------------------------------------
            with gr.Tab("X/Y grid", id="xy"):
                gr.Markdown("Sweeps two axes over the prompt and settings of the **Compose** tab. "
                            "`Prompt S/R`: the first value is found in the prompt and replaced by each value "
                            "(e.g. `<lora:a:0.5>, <lora:a:1>` sweeps a weight).")
                with gr.Row():
                    x_type = gr.Dropdown(list(XY_AXES), value="Seed", label="X axis", elem_id="x_type")
                    x_values = gr.Textbox(label="X values (comma-separated)", placeholder="1, 2, 3", elem_id="x_values")
                    y_type = gr.Dropdown(list(XY_AXES), value="Nothing", label="Y axis")
                    y_values = gr.Textbox(label="Y values (comma-separated)")
                with gr.Row():
                    xy_btn = gr.Button("Make grid", variant="primary", elem_id="xy_btn")
                    xy_stop = gr.Button("Stop", variant="stop")
                xy_info = gr.Markdown(elem_id="xy_info")
                xy_grid = gr.Image(label="Grid", type="filepath", format="png", interactive=False, height=400,
                                   buttons=["download", "fullscreen"], elem_id="xy_grid")
                xy_cells = gr.Gallery(label="Cells (PNG with metadata)", format="png", type="filepath", columns=8,
                                      height=200, interactive=False, buttons=["download"], object_fit="contain",
                                      elem_id="xy_cells")

            # ---- Train ------------------------------------------------------------------
            with gr.Tab("Train", id="train"):
                if h.available("training.dreambooth", "DreamBoothTrainer"):
                    with gr.Row():
                        with gr.Column():
                            train_files = gr.File(label="Instance images (and optional .txt captions)",
                                                  file_count="multiple", type="filepath", height=120,
                                                  file_types=[".png", ".jpg", ".jpeg", ".webp", ".bmp", ".txt"],
                                                  elem_id="train_files")
                            train_thumbs = gr.Gallery(label="Instance images", columns=10, height=180,
                                                      interactive=False, show_label=True)
                            train_folder = gr.Textbox(label="…or a folder on the server")
                            train_masks = gr.File(label="Concept masks (optional): one per image, same name",
                                                  file_count="multiple", type="filepath", height=100,
                                                  file_types=[".png", ".jpg", ".jpeg", ".webp", ".bmp"],
                                                  elem_id="train_masks")
                        with gr.Column():
                            with gr.Row():
                                train_trigger = gr.Textbox("sks", label="Trigger word")
                                train_class = gr.Textbox(train_defaults["class_word"], label="Class word",
                                                         placeholder=train_defaults["class_word"] or "dog",
                                                         elem_id="train_class")
                                train_kind = gr.Dropdown(list(CONCEPT_KINDS[1:]), value="object", label="Kind")
                            with gr.Row():
                                train_type = gr.Radio(["lora", "kron"], value="lora", label="Adapter type")
                                train_rank = gr.Number(4, precision=0, label="LoRA rank", elem_id="train_rank")
                                train_factors = gr.Textbox("krona-paper", label="Kronecker factors (A1xA2 or preset)",
                                                           visible=False)
                            with gr.Row():
                                train_steps = gr.Slider(1, 5000, value=train_defaults["steps"], step=1, label="Steps",
                                                        info=train_defaults["hint"], elem_id="train_steps")
                                train_layers = gr.Dropdown(
                                    [("Every attention layer", "attention"), ("Cross-attention only", "cross"),
                                     ("Cross-attention keys/values only", "cross-kv"),
                                     ("Attention + ResNet convolutions (LoCon)", "attention+conv")],
                                    value="attention", label="UNet layers", elem_id="train_layers",
                                    info="Cross-attention layers also learn the trigger's embedding and keep a "
                                         "concept in its own branch when composed (composite, CLoRA); they need "
                                         "more steps. Convolutions reach levels without attention: on the toy "
                                         "model an object's outline (the demo plus) needs them")
                                train_name = gr.Textbox(label="Adapter name (default: trigger)", elem_id="train_name")
                            with gr.Row():
                                train_prior = gr.Checkbox(False, label="Prior preservation")
                                train_stand_in = gr.Checkbox(
                                    False, label="Stand-in prior", elem_id="train_stand_in",
                                    info="Prior images of your captions with another word for the trigger, so the "
                                         "adapter answers only its own trigger (turns prior preservation on; "
                                         "README, \"--stand-in-prior\")")
                                train_attention = gr.Number(
                                    0, minimum=0, label="Attention loss", elem_id="train_attention",
                                    info="Pulls the trigger's attention onto each image's concept mask, so CLoRA "
                                         "finds the concept where it is drawn; 0.1 taught the demo crescent and "
                                         "plus, but it keeps the prompt's fill words off the object (leave 0 "
                                         "for an object that must take a style's fill). Needs masks (uploaded, "
                                         "or FOLDER/masks); 0: off")
                            with gr.Row():
                                train_btn = gr.Button("Train", variant="primary", elem_id="train_btn")
                                train_stop = gr.Button("Stop", variant="stop")
                            train_status = gr.Markdown(elem_id="train_status")
                            train_loss = gr.LinePlot(x="step", y="loss", label="Loss", height=200)
                            train_samples = gr.Gallery(label="Samples", format="png", type="filepath",
                                                       interactive=False, height=160)
                else:
                    gr.Markdown(h.availability("training.dreambooth", "Training"))

            # ---- Evaluate ---------------------------------------------------------------
            with gr.Tab("Evaluate", id="evaluate"):
                if h.available("studio.evaluation", "run_suite"):
                    with gr.Row():
                        eval_suite = gr.Dropdown(h.suites(), value=None, label="Suite (workflows/)")
                        eval_file = gr.File(label="…or upload a suite", file_types=[".yaml", ".yml", ".toml"],
                                            type="filepath")
                        eval_limit = gr.Number(None, precision=0, label="Limit (jobs)")
                        eval_dry = gr.Checkbox(False, label="Dry run (count jobs)")
                    with gr.Row():
                        eval_btn = gr.Button("Run", variant="primary")
                        eval_stop = gr.Button("Stop", variant="stop")
                    eval_log = gr.Textbox(label="Log", lines=8, max_lines=20)
                    eval_table = gr.Dataframe(label="Summary (means)", interactive=False)
                    eval_grids = gr.Gallery(label="Grids", format="png", type="filepath", interactive=False)
                    eval_zip = gr.File(label="Run folder (zip)", interactive=False)
                else:
                    gr.Markdown(h.availability("studio.evaluation", "Evaluation"))

        # ---- wiring -------------------------------------------------------------------------
        compose_inputs = [prompt, negative, method, params, sampler, seed, steps, guidance, width, height, batch]
        gen_event = generate_btn.click(
            h.generate, compose_inputs, [gallery, preview, info, report, extras, last_seed, status],
            api_name="generate", show_progress="hidden", **GPU,
        )
        gen_event.then(lambda: h.history.items(), None, history, api_visibility="private", **LIGHT)
        # Stop sets this session's flag; the run then says "Stopping…" and returns its finished images
        # (no cancel, so it can). The run is the only writer of its status line, so nothing stale stays.
        stop_btn.click(h.stop, None, stop_ack, api_name="stop", **LIGHT)
        xy_event = xy_btn.click(h.xy_grid, compose_inputs[:-1] + [x_type, x_values, y_type, y_values],
                                [xy_grid, xy_cells, xy_info], api_name="xy_grid", show_progress="hidden", **GPU)
        xy_event.then(lambda: h.history.items(), None, history, api_visibility="private", **LIGHT)
        xy_stop.click(h.stop_xy, None, stop_ack, api_visibility="private", **LIGHT)
        reuse.click(h.reuse_seed, last_seed, seed, api_visibility="private", **LIGHT)

        def bump(rev):
            return rev + 1

        method.input(h.method_params, method, params, api_visibility="private", **LIGHT) \
            .then(bump, fields_rev, fields_rev, api_visibility="private", **LIGHT)
        method.input(h.method_help, method, method_info, api_visibility="private", **LIGHT)
        method.input(h.method_guidance, method, guidance, api_visibility="private", **LIGHT)
        hint_inputs = [prompt, method, params]
        for trigger in (prompt.change, method.change, params.change, lib_rev.change, demo.load):
            trigger(h.method_hint, hint_inputs, [method_hint, use_pick], api_visibility="private", **LIGHT)
        use_pick.click(h.use_suggested_method, prompt, [method, params, guidance, method_info],
                       api_visibility="private", **LIGHT) \
            .then(bump, fields_rev, fields_rev, api_visibility="private", **LIGHT)

        def pick(evt: gr.SelectData):
            value = evt.value or {}
            image = value.get("image") if isinstance(value, dict) else None
            return image.get("path") if isinstance(image, dict) else None

        for g in (gallery, history):
            g.select(pick, None, picked, api_visibility="private", **LIGHT)
        picked.change(lambda p: p, picked, picked_view, api_visibility="private", **LIGHT)
        png_outputs = [png_image, png_text, png_recipe, png_status, png_fields]
        to_compose.click(h.read_png, picked, png_outputs, api_visibility="private", **LIGHT) \
            .then(h.send_to_compose, png_fields, compose_inputs, api_visibility="private", **LIGHT) \
            .then(bump, fields_rev, fields_rev, api_visibility="private", **LIGHT)
        to_pnginfo.click(lambda p: (p, gr.Tabs(selected="pnginfo")), picked, [png_file, tabs],
                         api_visibility="private", **LIGHT)
        to_xy.click(h.read_png, picked, png_outputs, api_visibility="private", **LIGHT) \
            .then(h.send_to_compose, png_fields, compose_inputs, api_visibility="private", **LIGHT) \
            .then(bump, fields_rev, fields_rev, api_visibility="private", **LIGHT) \
            .then(lambda f, t, v: (*seed_axis_from(f, t, v), gr.Tabs(selected="xy")), [png_fields, x_type, x_values],
                  [x_type, x_values, tabs], api_visibility="private", **LIGHT)

        def refresh(rev, current):
            """After a library change: lists, header count and (through lib_rev) every card grid redraw."""
            names = h.adapter_names()
            keep = current if current in names else None
            outs = [gr.Dropdown(choices=names, value=keep), gr.Dropdown(choices=names), rev + 1, h.header()]
            return outs + ([gr.Dropdown(choices=names, value=[])] if merge_names is not None else [])

        refresh_inputs = [lib_rev, edit_name]
        refresh_outputs = [edit_name, preview_for, lib_rev, header] + ([merge_names] if merge_names is not None else [])
        edit_outputs = [edit_trigger, edit_phrase, edit_concept, edit_kind, edit_weight, edit_preview]

        def redraw(rev, name):  # after an edit of the opened adapter: the cards and its form
            return rev + 1, *h.adapter_fields(name), h.adapter_details(name)

        set_preview.click(h.set_preview, [preview_for, picked], history_status, api_visibility="private", **LIGHT) \
            .then(redraw, [lib_rev, edit_name], [lib_rev, *edit_outputs, edit_title], api_visibility="private", **LIGHT)
        upload_btn.click(h.upload, [upload_file, upload_name], lib_status, api_name="upload_adapter", **LIGHT) \
            .then(refresh, refresh_inputs, refresh_outputs, api_visibility="private", **LIGHT)

        def on_card(action, text):  # one stable event for every drawn card's click (card_click_js)
            verb, name = h.parse_card_action(action)
            if verb == "insert":
                return h.insert_tag(text, name), gr.update(), gr.update()
            if verb == "open":
                return gr.update(), gr.Dropdown(value=name), gr.Tabs(selected="library")
            return gr.update(), gr.update(), gr.update()

        card_action.change(on_card, [card_action, prompt], [prompt, edit_name, tabs], api_visibility="private", **LIGHT)
        edit_name.change(lambda n: (*h.adapter_fields(n), h.adapter_details(n)), edit_name,
                         [*edit_outputs, edit_title], api_visibility="private", **LIGHT)
        save_btn.click(h.edit, [edit_name, edit_trigger, edit_concept, edit_kind, edit_weight, edit_phrase], lib_status,
                       api_name="edit_adapter", **LIGHT) \
            .then(redraw, [lib_rev, edit_name], [lib_rev, *edit_outputs, edit_title], api_visibility="private", **LIGHT)
        edit_preview.upload(h.set_preview, [edit_name, edit_preview], lib_status, api_visibility="private", **LIGHT) \
            .then(redraw, [lib_rev, edit_name], [lib_rev, *edit_outputs, edit_title], api_visibility="private", **LIGHT)
        use_picked.click(h.set_preview, [edit_name, picked], lib_status, api_visibility="private", **LIGHT) \
            .then(redraw, [lib_rev, edit_name], [lib_rev, *edit_outputs, edit_title], api_visibility="private", **LIGHT)
        delete_btn.click(h.delete, edit_name, lib_status, api_name="delete_adapter", **LIGHT,
                         js="(n) => (n && confirm(`Move ${n} to the library's trash?`)) ? n : null") \
            .then(refresh, refresh_inputs, refresh_outputs, api_visibility="private", **LIGHT)
        if merge_names is not None:
            merge_btn.click(h.merge, [merge_names, merge_method, merge_rank, merge_new], lib_status,
                            api_name="merge_adapters", **GPU) \
                .then(refresh, refresh_inputs, refresh_outputs, api_visibility="private", **LIGHT)
        if h.available("training.dreambooth", "DreamBoothTrainer"):
            train_files.change(h.instance_thumbnails, train_files, train_thumbs, api_visibility="private", **LIGHT)
            train_type.change(h.kind_fields, train_type, [train_rank, train_factors], api_visibility="private", **LIGHT)
            train_stand_in.input(h.stand_in_prior_box, train_stand_in, train_prior, api_visibility="private", **LIGHT)
            train_event = train_btn.click(
                h.train, [train_files, train_folder, train_trigger, train_class, train_kind, train_type, train_rank,
                          train_factors, train_steps, train_prior, train_name, train_layers, train_stand_in,
                          train_attention, train_masks],
                [train_loss, train_samples, train_status], api_name="train", show_progress="hidden", **GPU)
            train_event.then(refresh, refresh_inputs, refresh_outputs, api_visibility="private", **LIGHT)
            train_stop.click(h.stop_train, None, stop_ack, api_visibility="private", **LIGHT)
        if h.available("studio.evaluation", "run_suite"):
            eval_btn.click(h.evaluate, [eval_suite, eval_file, eval_limit, eval_dry],
                           [eval_log, eval_table, eval_grids, eval_zip], api_name="evaluate", **GPU)
            eval_stop.click(h.stop_evaluate, None, None, api_visibility="private", **LIGHT)
        demo.load(lambda: (h.header(), h.history.items(), *(gr.Dropdown(choices=h.adapter_names()),) * 2), None,
                  [header, history, preview_for, edit_name], api_visibility="private", **LIGHT)

        png_file.change(h.read_png, png_file, [png_image, png_text, png_recipe, png_status, png_fields],
                        api_name="png_info", **LIGHT)
        send_btn.click(h.send_to_compose, png_fields, compose_inputs, api_visibility="private", **LIGHT) \
            .then(lambda: gr.Tabs(selected="compose"), None, tabs, api_visibility="private", **LIGHT)
    return demo



def field_values(params_json: str | None, defaults: dict) -> dict:
    """Each parameter field's value: the JSON's where it has one of the field's type, else the default."""
    given = params_shown(params_json)

    def fits(value, default) -> bool:
        if isinstance(default, bool):
            return isinstance(value, bool)
        if isinstance(default, (int, float)):
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        return True

    return {k: given[k] if k in given and fits(given[k], d) else d for k, d in defaults.items()}


def set_param(params_json: str, key: str, value, default):
    """The JSON parameters with one field changed from its typed input (ints stay ints)."""
    params = params_shown(params_json)
    if isinstance(default, bool):
        value = bool(value)
    elif isinstance(default, int) and isinstance(value, float) and value == int(value):
        value = int(value)
    elif default is None and value == "":
        value = None
    params[key] = value
    return json.dumps(params, indent=1, sort_keys=True)


def launch_options(handlers: AppHandlers, max_file_size: str | int = "512mb") -> dict:
    """Gradio 6 app-level options: theme and css go to launch(); outputs served; uploads capped."""
    return dict(theme=gr.themes.Soft(), css=CSS, js=OPEN_TAB_JS, allowed_paths=[str(handlers.out_dir), str(handlers.store.folder)]
                + ([str(handlers.demo_dir)] if handlers.demo_dir else []),
                max_file_size=max_file_size)


# ``?tab=Library`` opens that tab: links to a tab, and headless screenshots of each one.
OPEN_TAB_JS = """() => {
  // Ctrl+Enter (Cmd+Enter) generates, Esc stops, from anywhere on the page, as in A1111
  document.addEventListener("keydown", (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === "Enter") {
      e.preventDefault();
      document.querySelector("#generate")?.click();
    } else if (e.key === "Escape") {
      document.querySelector("#stop")?.click();
    }
  });
  const want = new URLSearchParams(window.location.search).get("tab");
  if (!want) return;
  const click = () => {
    const b = [...document.querySelectorAll('button[role="tab"]')].find(x => x.innerText.trim() === want);
    if (b) b.click(); else setTimeout(click, 200);
  };
  click();
}"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="LoRA Composition Studio (Gradio app)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    p.add_argument("--model", default=None, help="diffusers folder or hub id (default: the bundled toy model)")
    p.add_argument("--adapters", default=str(demo_adapters_dir()), help="folder of demo *.safetensors to load")
    p.add_argument("--outputs", default=str(Path.cwd() / "outputs" / "app"), help="where generated PNGs are written")
    p.add_argument("--library", default=os.environ.get("STUDIO_LIBRARY", str(Path.cwd() / "outputs" / "library")),
                   help="adapter library folder, scanned at start (default outputs/library, or $STUDIO_LIBRARY)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images of one request drawn together (default: auto, 8 on CPU); 1 shows each image "
                        "as it finishes and lets Stop keep every finished one")
    p.add_argument("--max-file-size", default="512mb", help="upload size limit, e.g. 512mb")
    p.add_argument("--queue-size", type=int, default=32, help="most jobs waiting in the queue")
    args = p.parse_args(argv)
    try:
        studio = Studio.load(args.model)
    except StudioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    handlers = AppHandlers(studio, args.outputs, library_dir=args.library, demo_dir=args.adapters,
                           batch_size=args.batch_size)
    startup = handlers.open_library()
    for line in startup:
        print(line)
    demo = build_app(studio, handlers, startup)
    demo.queue(max_size=args.queue_size, default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share,
                **launch_options(handlers, args.max_file_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
