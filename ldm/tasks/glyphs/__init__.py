"""Glyphs: letters rendered with PIL's fonts (random affine jitter and stroke width, dark on white), captioned by
their class, plus a small CNN that recognises them. A user's own folder of images that no shipped VAE fits and whose
captions are outside the tiny text encoder's vocabulary: the own-data benchmark (bench/own_data.py) trains on it.

    python -m ldm.tasks.glyphs DIR --n 2000     # write DIR/*.png + DIR/metadata.jsonl
"""
