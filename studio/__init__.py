"""LoRA Composition Studio: train and compose LoRA / Kronecker adapters on diffusers pipelines."""

__version__ = "0.1.0"

from .studio import GenerationResult, Studio  # noqa: E402

__all__ = ["Studio", "GenerationResult", "__version__"]
