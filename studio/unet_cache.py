"""Deep-feature caching for a diffusers ``UNet2DConditionModel`` (DeepCache "branch 1").

``full_pass`` runs the whole UNet unchanged and also returns the hidden state entering
``up_blocks[-1]`` (for SD1.5: the output of ``up_blocks[2]`` after its upsampler, 640 channels at
H/8×W/8). ``shallow_pass`` recomputes only the shallow path: time embedding, ``conv_in``, the
resnet(+attention) pairs of ``down_blocks[0]`` (no downsampler), then ``up_blocks[-1]`` fed with
the cached tensor and the fresh skips, and the output head. Adapter hooks on the modules that run
still act. A shallow pass at the same (sample, t, conditioning, adapters) as the full pass that
filled the cache reproduces that pass's output exactly (tested).

Used by CMLoRA (composers/cmlora.py). It reuses the UNet's own submodules and never touches
attention processors, so it composes with the adapter rig's forward hooks.
"""

from __future__ import annotations

import torch


def full_pass(unet, sample: torch.Tensor, t, encoder_hidden_states: torch.Tensor,
              added_cond_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's output and the hidden state entering its last up block (the cached feature)."""
    captured: dict[str, torch.Tensor] = {}

    def grab(module, args, kwargs):
        captured["h"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    handle = unet.up_blocks[-1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        out = unet(sample, t, encoder_hidden_states=encoder_hidden_states,
                   added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]
    finally:
        handle.remove()
    return out, captured["h"]


def shallow_pass(unet, sample: torch.Tensor, t, encoder_hidden_states: torch.Tensor, cached: torch.Tensor,
                 added_cond_kwargs: dict | None = None) -> torch.Tensor:
    """The UNet's output with everything below the first down block replaced by ``cached``.

    Mirrors ``UNet2DConditionModel.forward`` (diffusers 0.42) for the layers it runs; class labels,
    attention masks, ControlNet/T2I residuals and ``image_hint`` embeddings are not supported.
    """
    cfg = unet.config
    if cfg.addition_embed_type == "image_hint" or cfg.class_embed_type is not None:
        raise NotImplementedError("shallow UNet passes do not support class or image-hint embeddings")
    if cfg.center_input_sample:
        sample = 2 * sample - 1.0
    t_emb = unet.get_time_embed(sample=sample, timestep=t)
    emb = unet.time_embedding(t_emb, None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
    emb = emb + aug if aug is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    ehs = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states,
                                             added_cond_kwargs=added_cond_kwargs)

    h = unet.conv_in(sample)
    skips = (h,)
    first = unet.down_blocks[0]
    attentions = getattr(first, "attentions", None) if getattr(first, "has_cross_attention", False) else None
    for i, resnet in enumerate(first.resnets):
        h = resnet(h, emb)
        if attentions is not None:
            h = attentions[i](h, encoder_hidden_states=ehs, cross_attention_kwargs=None, attention_mask=None,
                              encoder_attention_mask=None, return_dict=False)[0]
        skips += (h,)

    last = unet.up_blocks[-1]
    if len(last.resnets) != len(skips):
        raise NotImplementedError(
            f"last up block takes {len(last.resnets)} skips but the first down block gives {len(skips)}"
        )
    if getattr(last, "has_cross_attention", False):
        h = last(hidden_states=cached, temb=emb, res_hidden_states_tuple=skips, encoder_hidden_states=ehs,
                 cross_attention_kwargs=None, upsample_size=None, attention_mask=None, encoder_attention_mask=None)
    else:
        h = last(hidden_states=cached, temb=emb, res_hidden_states_tuple=skips, upsample_size=None)
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)
