"""Flax linen models with torchvision-mirroring parameter names."""
