"""The Gradio app's actions, one module per tab, over one shared ``Studio`` (layout is in app.py)."""

from .common import CONCEPT_KINDS, SAMPLER_CHOICES, SAMPLERS, XY_AXES, method_defaults, optional, params_shown
from .compose import METHOD_GUIDE, trigger_warnings
from .handlers import AppHandlers, load_demo_adapters
from .library import card_label, prompt_weights, set_tag_weight
from .xy import labelled_grid, seed_axis_from

__all__ = ["AppHandlers", "CONCEPT_KINDS", "METHOD_GUIDE", "SAMPLER_CHOICES", "SAMPLERS", "XY_AXES", "card_label",
           "labelled_grid", "load_demo_adapters", "method_defaults", "optional", "params_shown", "prompt_weights",
           "seed_axis_from", "set_tag_weight", "trigger_warnings"]
