"""Pure-JAX operations on boxes and feature maps; jittable, vmappable and pmappable."""
