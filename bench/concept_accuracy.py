"""Per-concept prompt accuracy of a shapes model: the measure of the "teach it something new" examples.

``concept_accuracy(bundle, prompts)`` samples each prompt with classifier-free guidance and scores the images with
the shapes checker (over the colours the prompts name, so a colour the base never saw is a possible answer), then
groups the hits by the prompt's colour. ``shapes_prompts(colors)`` are every colour x shape prompt, the repeats
cycling through the colour's backgrounds as the end-of-run prompt accuracy does. Used by bench/shapes_lora.py (and
any other bench that teaches the shapes model a new colour).
"""

from __future__ import annotations

from collections import defaultdict

import torch


def shapes_prompts(colors, n_per_prompt: int = 4) -> list[tuple[str, str, str]]:
    """(prompt, colour, shape) for the end-of-run prompt accuracy's prompts (every colour x shape,
    ``n_per_prompt`` times, cycling through the backgrounds) over ``colors``."""
    from ldm.tasks.shapes.palette import parse_caption
    from ldm.tasks.shapes.dataset import ShapesDataset
    from ldm.tasks.shapes.prompt_accuracy import PromptAccuracyCallback

    prompts = PromptAccuracyCallback(n_per_prompt=n_per_prompt).prompts(ShapesDataset(size=1, colors=list(colors)))
    return [(p, *parse_caption(p)) for p in prompts]


@torch.no_grad()
def concept_accuracy(bundle, items, *, checker_colors, guidance: float = 3.0, steps: int = 25, seed: int = 1234,
                     batch: int = 64, resolution: int | None = None, prompt_of=lambda prompt: prompt) -> dict:
    """{colour: {"color_acc", "shape_acc", "n"}} plus "all": samples of ``prompt_of(prompt)`` judged against the
    item's colour and shape, at ``resolution`` (default: the model's training resolution). ``prompt_of`` maps the scored prompt to the one sampled (e.g. a new token for a
    colour)."""
    from ldm.tasks.shapes.checker import ShapesChecker
    from ldm.pipelines import text_to_image

    checker = ShapesChecker(colors=tuple(checker_colors))
    hits = defaultdict(lambda: [0, 0, 0])
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        images = text_to_image(bundle, [prompt_of(p) for p, _, _ in chunk], sampler="ddim", steps=steps,
                               guidance_scale=guidance, seed=seed + start, height=resolution, width=resolution)
        for image, (_, color, shape) in zip(images, chunk):
            got_color, got_shape = checker.classify(image)
            for key in (color, "all"):
                hits[key][0] += got_color == color
                hits[key][1] += got_shape == shape
                hits[key][2] += 1
    return {k: {"color_acc": c / n, "shape_acc": s / n, "n": n} for k, (c, s, n) in hits.items()}
