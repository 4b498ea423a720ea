"""Kept for old imports: the app's actions now live in ``studio.app`` (one module per tab)."""

from studio.app import *  # noqa: F401,F403
from studio.app import AppHandlers, load_demo_adapters  # noqa: F401
