"""The synthetic shapes: the embedded default task (``python train.py`` trains on it).

- ``dataset``: coloured circles / squares / triangles on plain backgrounds, captioned ("a red circle on a white
  background"); configs/data/shapes.yaml builds it.
- ``palette``: the colour and shape names, their RGB values, caption parsing.
- ``checker``: reads (colour, shape) back from an image. A ShapesDataset offers one as ``checker()``, which is how
  the evaluation metrics (ldm.evaluation.metrics.PromptAccuracy) get it without importing this task.
- ``prompt_accuracy``: the end-of-training callback (``callbacks.prompt_accuracy``) that samples every colour x shape
  prompt and scores it with the checker.
- ``guidance_scorers``: differentiable scorers for classifier guidance (the mean-colour scorer).
"""
