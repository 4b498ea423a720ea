"""The Gradio app's actions, one module per tab, over one shared ``Studio`` (layout is in app.py)."""

from .common import CONCEPT_KINDS, LIBRARY_HEADERS, SAMPLER_CHOICES, SAMPLERS, XY_AXES, method_defaults, optional
from .compose import METHOD_GUIDE, trigger_warnings
from .handlers import AppHandlers, load_demo_adapters
from .library import prompt_weights, set_tag_weight
from .xy import labelled_grid

__all__ = ["AppHandlers", "CONCEPT_KINDS", "LIBRARY_HEADERS", "METHOD_GUIDE", "SAMPLER_CHOICES", "SAMPLERS", "XY_AXES",
           "labelled_grid", "load_demo_adapters", "method_defaults", "optional", "prompt_weights",
           "set_tag_weight", "trigger_warnings"]
