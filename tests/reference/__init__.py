"""The bridge between a JAX run and the PyTorch InsLoc of `insloc_torch` (the independent reference step):
weights in torch names, the matching torch encoder, and the random draws of a JAX step (`from_jax.py`)."""
