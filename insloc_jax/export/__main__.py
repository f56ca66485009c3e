"""`python -m insloc_jax.export ...` (see `run.main`)."""
import sys

from insloc_jax.export.run import main

sys.exit(main())
