"""Data: the `moving_shapes` and `synthetic_latent_text` TFDS builders, grain input pipelines, and the
synthetic-domain evaluator.

moving_shapes  procedural dataset (render, captions/labels, TFDS builder, prepare / data_source)
latent_text    synthetic_latent_text: moving_shapes clips as float latents with text embeddings and masks
pipeline       grain pipeline over any array_record TFDS source with a video feature (and text fields)
evaluate       colour / shape / direction accuracy and temporal consistency of generated videos
sources        which dataset a config names, opened as a pipeline; sampling conditions; the local data dir
"""
