"""`python -m insloc_jax.finetune`: see insloc_jax/finetune/run.py."""
from insloc_jax.finetune.run import entry

entry()
