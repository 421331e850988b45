"""The tiny SD3 model twice: diffusers' StableDiffusion3Pipeline (tests/helpers/sd3.py) and our ModelBundle with the
same weights (its transformer mapped by ldm.formats.sd3_diffusers_keys, SD3TextEncoder on the same CLIPs and T5)."""

from __future__ import annotations

import copy

from pathlib import Path

from tests.helpers.sd3 import MMDIT_TINY, tiny_sd3_pipeline

T5_LENGTH = 8  # the T5 tokens both sides encode (diffusers' max_sequence_length)


def tiny_sd3(tmp: Path, use_t5: bool = False, shift: float = 3.0):
    """-> (diffusers pipeline, our bundle)."""
    from ldm.diffusion.flow import FlowMatching
    from ldm.formats.sd3_diffusers_keys import mmdit_from_diffusers
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.bundle import ModelBundle
    from ldm.models.mmdit import MMDiT
    from ldm.models.text_encoder_sd3 import SD3TextEncoder

    pipe = tiny_sd3_pipeline(tmp, use_t5=use_t5, shift=shift)
    unet = MMDiT(**MMDIT_TINY).eval()
    unet.load_state_dict(mmdit_from_diffusers(pipe.transformer.state_dict(), unet.config))
    # copies of the pipeline's CLIPs (CLIP-L's projection is SD3's identity there) and T5 (or none, as
    # text_encoder_3=None): copies, so that a LoRA loaded into the pipeline does not change ours
    te = SD3TextEncoder(*copy.deepcopy((pipe.text_encoder, pipe.tokenizer, pipe.text_encoder_2, pipe.tokenizer_2,
                                        pipe.text_encoder_3, pipe.tokenizer_3)), joint_dim=96, t5_length=T5_LENGTH)
    return pipe, ModelBundle(unet, AutoencoderKL.from_preset("tiny"), te, FlowMatching(shift=shift))
