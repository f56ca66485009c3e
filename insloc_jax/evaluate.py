"""`python -m insloc_jax.evaluate --workdir DIR [--step N | --random] [--config X.py]`: the probes of
`insloc_jax.eval` (see `eval/run.py` for what each measures) on a run's checkpoint."""

if __name__ == "__main__":
    from absl import app

    from insloc_jax import config as config_lib
    from insloc_jax.eval import run

    run.define_flags()
    app.run(run.main, flags_parser=config_lib.parse_flags)
