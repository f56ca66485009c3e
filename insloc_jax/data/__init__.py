"""Input pipeline: sources, composition, augmentation, batching. Imports TensorFlow lazily per module."""
