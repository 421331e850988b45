"""Checkpoint I/O: safe loading, SD single files, diffusers folders, key maps."""

from ldm.checkpoints.diffusers_folder import (
    load_diffusers_folder,
    read_scheduler_config,
    save_diffusers_folder,
)
from ldm.checkpoints.diffusers_keys import (
    unet_config_from_diffusers,
    unet_diffusers_config,
    unet_diffusers_to_ldm,
    unet_ldm_to_diffusers,
    vae_config_from_diffusers,
    vae_diffusers_config,
    vae_diffusers_to_ldm,
    vae_ldm_to_diffusers,
)
from ldm.checkpoints.openclip_keys import hf_to_openclip, openclip_to_hf
from ldm.checkpoints.safe_load import CheckpointError, load_into, load_state_dict
from ldm.checkpoints.single_file import load_single_file, split_sd_checkpoint, to_single_file

__all__ = [
    "CheckpointError",
    "hf_to_openclip",
    "load_diffusers_folder",
    "load_into",
    "load_single_file",
    "load_state_dict",
    "openclip_to_hf",
    "read_scheduler_config",
    "save_diffusers_folder",
    "split_sd_checkpoint",
    "to_single_file",
    "unet_config_from_diffusers",
    "unet_diffusers_config",
    "unet_diffusers_to_ldm",
    "unet_ldm_to_diffusers",
    "vae_config_from_diffusers",
    "vae_diffusers_config",
    "vae_diffusers_to_ldm",
    "vae_ldm_to_diffusers",
]
