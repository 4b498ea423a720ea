"""Train tab: DreamBooth LoRA / Kronecker training on the Studio's base, saved into the library."""

from __future__ import annotations

import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Iterator

import gradio as gr
from PIL import Image

from studio.adapters.library import safe_name
from studio.adapters.store import read_index
from studio.errors import StudioError

from .common import as_int, error_text, message, optional
from .runs import Progress

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
STAND_IN_PROMPTS = 36  # stand-in prior prompts when the Train tab asks for them (the demo adapters hold 36)


class TrainingCancelled(StudioError):
    """Stop was pressed during training."""


def train_defaults(arch: str, demo_folder: str | Path | None) -> dict:
    """Class word and step count for this base: the toy world's ``shape`` and its demo recipe's steps."""
    steps = [int(e["steps"]) for e in read_index(demo_folder).values()
             if isinstance(e, dict) and e.get("type", "lora") == "lora" and e.get("steps")] if demo_folder else []
    if arch == "toy":
        span = f"{min(steps)}–{max(steps)}" if steps else "300–2000"
        return dict(class_word="shape", steps=int(statistics.median(steps)) if steps else 700,
                    hint=f"The demo LoRAs were trained for {span} steps (backgrounds fewest, objects on "
                         "cross-attention most); 150 steps gives a blob.")
    return dict(class_word="", steps=int(statistics.median(steps)) if steps else 500,
                hint="Typical DreamBooth LoRA runs: 500–1500 steps on 5–20 images.")


def _loss_table(history: list[dict]):
    import pandas as pd

    # plain ints and floats: a column of numpy or tensor scalars reaches the plot as categories
    rows = [{"step": int(h["step"]), "loss": float(h["loss"])} for h in list(history) if "loss" in h]
    return pd.DataFrame(rows, columns=["step", "loss"]).astype({"step": "int64", "loss": "float64"})


class TrainTab:
    """Train actions; mixed into ``AppHandlers`` (needs ``studio``, ``store``, ``runs``, ``out_dir``)."""

    def stop_train(self, request: gr.Request | None = None) -> str:
        return self.runs.stop(request, "train")

    @staticmethod
    def instance_thumbnails(files: list[str] | None) -> list[tuple[str, str]]:
        """The uploaded instance images as (path, file name), for a thumbnail gallery."""
        return [(f, Path(f).name) for f in files or () if Path(f).suffix.lower() in IMAGE_SUFFIXES]

    @staticmethod
    def stand_in_prior_box(stand_in: bool):
        """Ticking "Stand-in prior" ticks "Prior preservation" too: the stand-ins are prior images."""
        return gr.update(value=True) if stand_in else gr.skip()

    @staticmethod
    def kind_fields(adapter_type: str) -> tuple:
        """Show the LoRA rank for ``lora`` and the Kronecker factors for ``kron``."""
        return gr.update(visible=adapter_type == "lora"), gr.update(visible=adapter_type == "kron")

    def train(
        self, files: list[str] | None, folder: str, trigger: str, class_word: str, concept_kind: str = "object",
        adapter_type: str = "lora", rank=4, factors: str = "krona-paper", steps=700, prior_preservation: bool = False,
        name: str = "", unet_targets: str = "attention", stand_in_prior: bool = False,
        attention_loss=0.0, masks: list[str] | None = None, request: gr.Request | None = None,
    ) -> Iterator[tuple]:
        """DreamBooth-train a LoRA or Kronecker adapter; it is saved into the library folder.

        Yields (loss table, samples, status) about twice a second while training runs in a worker.
        """
        dreambooth = optional("training.dreambooth")
        if dreambooth is None or not hasattr(dreambooth, "DreamBoothTrainer"):
            yield gr.skip(), gr.skip(), message("training is not available yet (training.dreambooth is missing)")
            return
        try:
            cfg, name = self._train_config(dreambooth, files, folder, trigger, class_word, concept_kind,
                                           adapter_type, rank, factors, steps, prior_preservation, name,
                                           unet_targets, stand_in_prior, attention_loss, masks)
            trainer = dreambooth.DreamBoothTrainer(self.studio, cfg)
        except (StudioError, gr.Error, ValueError) as e:
            yield gr.skip(), gr.skip(), message(error_text(e))
            return
        key, stop = self.runs.register(request, "train")
        step_fn = trainer.train_step

        def train_step():  # Stop ends the run between optimizer steps; layers are stripped by run()
            if stop.is_set():
                raise TrainingCancelled(f"training stopped by the user at step {trainer.step}")
            return step_fn()

        trainer.train_step = train_step
        progress = Progress(1, cfg.steps)
        worker, box = self.runs.start_worker(trainer.run)
        try:
            while worker.is_alive():
                worker.join(0.5)
                loss = trainer.history[-1].get("loss") if trainer.history else None
                line = ("Stopping… (at the next optimizer step) · " if stop.is_set() else "training: ") + \
                    progress.line(0, max(trainer.step, 0))
                yield _loss_table(trainer.history), gr.skip(), line + (f" · loss {loss:.4f}" if loss is not None else "")
            error = box.get("error")
            if isinstance(error, TrainingCancelled):
                yield _loss_table(trainer.history), gr.skip(), message(f"Stopped at step {trainer.step}; nothing was added.", "info")
                return
            if error is not None:
                if not isinstance(error, StudioError):
                    raise error
                yield gr.skip(), gr.skip(), message(error_text(error))
                return
            adapter = box["result"]
            adapter.name, adapter.trigger, adapter.concept = name, cfg.trigger, cfg.class_word
            adapter.concept_kind = cfg.concept_kind
            try:
                added = self.store.save_new(adapter, "trained", file=cfg.out,
                                            trigger_phrase=f"a {cfg.trigger} {cfg.class_word}")
            except StudioError as e:
                yield gr.skip(), gr.skip(), message(f"the trained adapter could not be added: {error_text(e)}")
                return
            samples = [(trainer.outputs["grid"], "final samples")] if trainer.outputs.get("grid") else []
            yield (_loss_table(trainer.history), samples,
                   f"Trained **{added.name}** ({adapter_type}, {trainer.step} steps) and saved it into the library "
                   f"(`{self.store.folder}`).")
        finally:
            stop.set()
            self.runs.unregister(key, stop)

    def _train_config(self, dreambooth, files, folder, trigger, class_word, concept_kind, adapter_type, rank,
                      factors, steps, prior_preservation, name, unet_targets="attention", stand_in_prior=False,
                      attention_loss=0.0, masks=None):
        """The TrainConfig for a request, with uploaded files copied into a run folder. Cross-attention
        layers come with a learnt trigger embedding: alone they barely bind the trigger. A ticked
        stand-in box asks for ``STAND_IN_PROMPTS`` stand-in prior prompts. Uploaded concept masks go to
        ``images/masks/`` as PNGs under their image's name (what the trainer's attention loss reads)."""
        trigger = (trigger or "").strip()
        if not trigger or not (class_word or "").strip():
            raise gr.Error("give a trigger word (e.g. sks) and a class word (e.g. shape)")
        layers = unet_targets or "attention"
        if layers != "attention":
            from studio.adapters.activation import single_token_id

            try:
                single_token_id(self.studio.pipe.tokenizer, trigger,
                                owner="cross-attention layers learn the trigger's own embedding, so it must be one token")
            except StudioError as e:
                raise gr.Error(str(e)) from None
        name = safe_name(name.strip() if name and name.strip() else trigger)
        if name in self.studio.adapters:
            raise gr.Error(f"an adapter named {name!r} is already in the library; choose another name")
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
        run_dir, n = self.out_dir / "train" / stamp, 2
        while run_dir.exists():  # a second request in the same second gets its own folder
            run_dir, n = run_dir.with_name(f"{stamp}-{n}"), n + 1
        images = run_dir / "images"
        weight = _attention_weight(attention_loss)
        if files:
            stems = {safe_name(Path(f).stem) for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES}
            mask_sources = _matched_masks(masks, stems)
            if weight and not mask_sources:
                raise gr.Error("the attention loss needs a concept mask per instance image: upload masks named like "
                               "the images (img0.png for img0.jpg, white where the concept is), or set it to 0")
            images.mkdir(parents=True, exist_ok=True)
            for f in files:
                src = Path(f)
                if src.suffix.lower() in IMAGE_SUFFIXES + (".txt",):
                    shutil.copyfile(src, images / f"{safe_name(src.stem)}{src.suffix.lower()}")
            if mask_sources:
                (images / "masks").mkdir()
                for stem, mask in mask_sources.items():
                    mask.save(images / "masks" / f"{stem}.png")
        elif folder and folder.strip():
            images = Path(folder.strip()).expanduser()
            if not images.is_dir():
                raise gr.Error(f"instance image folder {str(images)!r} does not exist; upload images or give a folder")
            if masks:
                raise gr.Error(f"masks for a server folder are read from {str(images / 'masks')!r} (same names as the "
                               "images); remove the uploaded masks or upload the images too")
        else:
            raise gr.Error("upload instance images or give a folder of them")
        cfg = dreambooth.TrainConfig(
            images=str(images), out=str(run_dir / f"{name}.safetensors"), trigger=trigger,
            class_word=class_word.strip(), concept_kind=concept_kind or "object", name=name,
            adapter=adapter_type, rank=as_int(rank, "rank"), factors=factors or "krona-paper",
            steps=as_int(steps, "steps"), prior_preservation=bool(prior_preservation),
            output_dir=str(run_dir / "run"), num_validation_images=2,
            unet_targets=layers, train_token_embedding=layers != "attention",
            stand_in_prior=STAND_IN_PROMPTS if stand_in_prior else 0, attention_loss=weight,
        )
        return cfg, name


def _attention_weight(value) -> float:
    """The attention loss weight from the form: empty is 0 (off)."""
    try:
        weight = 0.0 if value in (None, "") else float(value)
    except (TypeError, ValueError):
        weight = math.nan
    if not 0 <= weight < math.inf:
        raise gr.Error(f"attention loss must be a number ≥ 0 (0.1 taught the demo objects), got {value!r}")
    return weight


def _matched_masks(masks: list[str] | None, stems: set[str]) -> dict[str, Image.Image]:
    """Uploaded concept masks, read as greyscale, by their image's name. A mask that names no uploaded image,
    is not an image or cannot be read is refused before anything is copied."""
    found: dict[str, Image.Image] = {}
    for f in masks or ():
        src = Path(f)
        stem = safe_name(src.stem)
        if src.suffix.lower() not in IMAGE_SUFFIXES:
            raise gr.Error(f"concept mask {src.name!r} is not an image; upload PNG masks (white where the concept is)")
        if stem not in stems:
            raise gr.Error(f"concept mask {src.name!r} matches no instance image (images: {', '.join(sorted(stems))}); "
                           "name each mask like its image")
        try:
            with Image.open(src) as im:
                found[stem] = im.convert("L")
        except Exception as e:
            raise gr.Error(f"concept mask {src.name!r} is unreadable ({type(e).__name__}); upload it again") from None
    return found
