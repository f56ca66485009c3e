"""One process of the multi-host training test: the training command on the tiny config, stopped by a signal
that reaches only process 1, then resumed to the end.

    python tests/multihost_train_worker.py PROCESS_ID NUM_PROCESSES PORT DATA_DIR WORKDIR

Two local CPU devices per process, gloo collectives over 127.0.0.1:PORT. Prints `RESULTS <json>` with the
two runs' {"step", "stopped_by", "loss"}.
"""
import json
import os
import signal
import sys

from xla_flags import flags as xla_test_flags

PROCESS, PROCESSES, PORT = (int(a) for a in sys.argv[1:4])
DATA_DIR, WORKDIR = sys.argv[4:6]
os.environ["XLA_FLAGS"] = xla_test_flags(2)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

from configs import tiny  # noqa: E402
from insloc_jax import parallel, train  # noqa: E402

SIGNAL_AT_CALL = 2  # process 1 is signalled while dispatching its second step
train.STOP_SYNC_EVERY = 4  # so every process stops after step 4


def signal_process_one(compile_step):
    """Wraps train's step compiler so that process 1 sends itself SIGTERM before its second step."""
    def compile_and_wrap(*args, **kwargs):
        step_fn = compile_step(*args, **kwargs)
        calls = [0]

        def step(state, batch):
            calls[0] += 1
            if PROCESS == 1 and calls[0] == SIGNAL_AT_CALL:
                os.kill(os.getpid(), signal.SIGTERM)
            return step_fn(state, batch)
        return step
    return compile_and_wrap


def main():
    parallel.initialize_distributed(f"127.0.0.1:{PORT}", PROCESSES, PROCESS)
    config = tiny.get_config()
    config.data.source.data_dir = DATA_DIR
    config.train.update(total_steps=8, checkpoint_every=100, log_every=2)
    plain = train.compile_step
    train.compile_step = signal_process_one(plain)
    first = train.train(config, WORKDIR)
    train.compile_step = plain
    second = train.train(config, WORKDIR)
    runs = [{"step": r["step"], "stopped_by": r["stopped_by"], "loss": r["metrics"].get("loss")}
            for r in (first, second)]
    print("RESULTS", json.dumps(runs), flush=True)


if __name__ == "__main__":
    main()
