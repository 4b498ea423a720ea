"""Library tab and adapter cards: the on-disk adapter library (``AdapterStore``) as an artist sees it.

Upload (duplicates named), edit (written at once), delete (to the trash, after a confirmation in
the browser), merge (saved into the library), previews, and the weight sliders of the adapters a
prompt uses. Every change goes through the store, so it survives a restart.
"""

from __future__ import annotations

import re
from pathlib import Path

import gradio as gr

from studio.adapters.library import safe_name
from studio.errors import StudioError
from studio.prompts import format_tag, parse_prompt

from .common import CONCEPT_KINDS, PICKLE_SUFFIXES, as_int, error_text, optional

_TAG = re.compile(r"<lora:([^:>]+)((?::[^>]*)?)>")


def set_tag_weight(prompt: str, name: str, weight: float) -> str:
    """The prompt with ``<lora:name:…>`` rewritten to ``<lora:name:weight>`` (other tags untouched)."""
    return _TAG.sub(lambda m: format_tag(name, weight) if m.group(1).strip() == name else m.group(0), prompt or "")


def prompt_weights(prompt: str) -> list[tuple[str, float]]:
    """(adapter name, UNet weight) of each ``<lora:…>`` tag in the prompt; [] when it does not parse."""
    try:
        return [(t.name, t.unet) for t in parse_prompt(prompt or "")[1]]
    except StudioError:
        return []


def card_label(card: dict) -> str:
    """A Library card's text under its preview: name, then kind · type, then the trigger phrase."""
    phrase = card["phrase"] or card["trigger"] or "no trigger"
    weight = f" · w {card['weight']:g}" if card["weight"] != 1 else ""
    return f"{card['name']}\n{card['kind'] or 'no kind'} · {card['type']}{weight}\n“{phrase}”"


class LibraryTab:
    """Library actions; mixed into ``AppHandlers`` (needs ``studio`` and ``store``)."""

    # ---- reading ---------------------------------------------------------------------------
    def header(self) -> str:
        """The page header: model and the current adapter count."""
        s = self.studio
        return (f"## LoRA Composition Studio\nModel **{s.model_id}** ({s.arch}) · {len(s.adapters)} adapter(s) "
                f"in the library (`{self.store.folder}`)")

    def _sidecar_field(self, name: str, field: str) -> str | None:
        try:
            return getattr(self.store.meta(name), field)
        except StudioError:
            return None

    def phrase_of(self, name: str) -> str | None:
        """The phrase the adapter was taught (e.g. ``on a wvu background``), if known."""
        return self._sidecar_field(name, "trigger_phrase")

    def example_of(self, name: str) -> str | None:
        """A whole prompt that draws the adapter's concept (e.g. ``a red circle on a wvu background``), if known."""
        return self._sidecar_field(name, "example_prompt")

    def adapter_names(self) -> list[str]:
        return [a.name for a in self.studio.adapters.list()]

    def adapter_cards(self, search: str = "", kind: str = "") -> list[dict]:
        """What a card shows (name, tag, trigger phrase, kind, weight, shape, preview), filtered."""
        cards = []
        needle = (search or "").strip().lower()
        for a in self.studio.adapters.list():
            side = self.store.meta(a.name)
            phrase = side.trigger_phrase or a.trigger or ""
            if kind and (a.concept_kind or "") != kind:
                continue
            if needle and needle not in " ".join([a.name, phrase, a.concept or "", a.concept_kind or ""]).lower():
                continue
            cards.append(dict(
                name=a.name, tag=format_tag(a.name, a.weight), trigger=a.trigger or "", phrase=phrase,
                kind=a.concept_kind or "", type=a.kind, weight=a.weight, arch=a.arch or "?",
                format=a.format or "in memory", source=side.source,
                shape=", ".join(f"rank {r}" for r in a.ranks()) or ", ".join(f"{x}×{y}" for x, y in a.kron_factors()),
                preview=self.store.preview_path(a.name),
            ))
        return cards

    def library_summary(self, shown: int) -> str:
        """``Showing 3 of 8 adapters`` above the Library's card grid."""
        total = len(self.studio.adapters)
        return f"{total} adapter(s) in the library" if shown == total else f"Showing {shown} of {total} adapter(s)"

    def adapter_details(self, name: str | None) -> str:
        """The heading of the edit form: name, type, shape, source and file of the opened adapter."""
        if not name or name not in self.studio.adapters:
            return "### Edit\nClick a card to open an adapter."
        card = next((c for c in self.adapter_cards() if c["name"] == name), None)
        a = self.studio.adapters.get(name)
        where = f"`{a.path}`" if a.path else "in memory"
        return (f"### {name}\n{card['type']} · {card['shape'] or '?'} · {card['arch']} · "
                f"{card['source']} · {where}")

    def adapter_fields(self, name: str | None) -> tuple:
        """(trigger, trigger phrase, concept, kind, weight, preview) of one adapter, for the edit form."""
        if not name or name not in self.studio.adapters:
            return "", "", "", "", 1.0, None
        a = self.studio.adapters.get(name)
        side = self.store.meta(name)
        return a.trigger or "", side.trigger_phrase or "", a.concept or "", a.concept_kind or "", a.weight, \
            self.store.preview_path(name)

    # ---- changing --------------------------------------------------------------------------
    def upload(self, path: str | None, name: str = "") -> str:
        """Validate an uploaded ``.safetensors`` adapter and copy it into the library folder."""
        if not path:
            return "Error: choose a .safetensors file first."
        src = Path(path)
        suffix = src.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            return f"Error: {src.name} is a pickle file ({suffix}), which can run code when loaded; convert it to .safetensors first."
        if suffix != ".safetensors":
            return f"Error: {src.name} is not a .safetensors file; upload a LoRA/LoKr adapter saved as .safetensors."
        target = safe_name(name.strip() if name and name.strip() else src.stem)
        try:
            adapter, duplicate = self.store.import_file(src, target)
        except StudioError as e:
            return f"Error: {error_text(e)}"
        except Exception as e:  # never a traceback for a bad file
            first = str(e).splitlines()[0] if str(e) else ""
            return f"Error: could not read {src.name} as an adapter ({type(e).__name__}: {first}); check the file."
        msg = f"Loaded **{adapter.name}** ({adapter.format or 'adapter'}, {adapter.kind}, {len(adapter.layers)} modules)."
        if duplicate:
            msg += (f" ⚠ Duplicate: it has the same hash as **{duplicate}**, already in the library; "
                    f"delete one of them unless you want both names.")
        return msg

    def edit(self, name: str | None, trigger: str, concept: str, kind: str, weight, phrase: str | None = None) -> str:
        """Change an adapter's trigger, phrase, concept, kind and preferred weight; saved at once."""
        if not name:
            return "Error: pick an adapter to edit."
        if name not in self.studio.adapters:
            return f"Error: no adapter named {name!r} in the library."
        if kind and kind not in CONCEPT_KINDS:
            return f"Error: kind {kind!r} is not one of {', '.join(k for k in CONCEPT_KINDS if k)}."
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            return f"Error: weight {weight!r} is not a number; preferred weights are usually 0–2."
        fields = dict(trigger=(trigger or "").strip() or None, concept=(concept or "").strip() or None,
                      kind=kind or None, weight=weight)
        if phrase is not None:
            fields["trigger_phrase"] = phrase.strip() or None
        try:
            self.store.update(name, **fields)
        except (StudioError, OSError) as e:
            return f"Error: {error_text(e)}"
        return f"Saved metadata of **{name}**."

    def delete(self, name: str | None) -> str:
        """Move an adapter to the library's trash (the browser asks first; an empty name means cancelled)."""
        if not name:
            return "Nothing deleted."
        try:
            where = self.store.trash(name)
        except (StudioError, OSError) as e:
            return f"Error: {error_text(e)}"
        return f"Deleted **{name}** from the library: {where}."

    def set_preview(self, name: str | None, image_path: str | None) -> str:
        """Use an image (from the gallery or history) as an adapter's preview."""
        if not name or not image_path:
            return "Error: select an image and an adapter first."
        try:
            self.store.set_preview(name, image_path)
        except (StudioError, OSError) as e:
            return f"Error: {error_text(e)}"
        return f"Preview of **{name}** set."

    def merge_available(self) -> bool:
        return optional("studio.adapters.merge", "merge_adapters") is not None

    def merge_methods(self) -> list[str]:
        return list(optional("studio.adapters.merge", "METHODS") or ())

    def merge(self, names: list[str] | None, method: str, rank, new_name: str) -> str:
        """Merge library adapters at their preferred weights into a new adapter saved in the library."""
        merge_adapters = optional("studio.adapters.merge", "merge_adapters")
        if merge_adapters is None:
            return "Merging is not available yet (studio.adapters.merge is missing)."
        if not names or len(names) < 2:
            return "Error: pick at least two adapters to merge."
        new = safe_name(new_name.strip() if new_name and new_name.strip() else "+".join(names))
        if new in self.studio.adapters:
            return f"Error: an adapter named {new!r} already exists; choose another name."
        try:
            adapters = [self.studio.adapters.get(n) for n in names]
            rank = None if rank in (None, "", 0) else as_int(rank, "rank")
            merged = merge_adapters(adapters, method=method, rank=rank, name=new)
            merged.name = new
            merged.arch = merged.arch or self.studio.arch
            phrases = [p for p in (self.phrase_of(n) for n in names) if p]
            merged = self.store.save_new(merged, "merged", trigger_phrase=", ".join(phrases) or None)
        except (StudioError, gr.Error) as e:
            return f"Error: {error_text(e)}"
        return f"Merged {', '.join(names)} into **{merged.name}** ({method}, {len(merged.layers)} modules)."
