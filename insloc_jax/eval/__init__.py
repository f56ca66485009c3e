"""Quality probes on the frozen query encoder's backbone (what `python -m insloc_jax.evaluate` runs).

  data.py      the held-out probe data: composites with true and jittered boxes, whole images, labels
  features.py  the encoder's box / grid / pooled features on them, in JAX
  probes.py    the probe maths in numpy: retrieval, kNN, ridge box regression, paired differences
  run.py       one evaluation of a checkpoint or of the random init, the training loop's periodic one, the CLI
"""
