"""Sharded training of the LightningModule: FSDP2 for trainer=fsdp2 (``fsdp2.py``)."""
