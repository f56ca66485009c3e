"""One process of the multi-host test: 3 train steps of the tiny config on a fixed global batch.

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES

Prints one line `LOSSES <json list>`. With NUM_PROCESSES > 1 the processes meet at 127.0.0.1:PORT through
`jax.distributed` and run their collectives over gloo; each feeds its slice of the same global batch.
"""
import json
import os
import sys

from xla_flags import flags as xla_test_flags

PROCESS, PROCESSES, PORT, LOCAL = (int(a) for a in sys.argv[1:5])
os.environ["XLA_FLAGS"] = xla_test_flags(LOCAL)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")

import functools  # noqa: E402

import numpy as np  # noqa: E402

from configs import tiny  # noqa: E402
from insloc_jax import config as config_lib  # noqa: E402
from insloc_jax import parallel  # noqa: E402
from insloc_jax.state import initial_state  # noqa: E402
from insloc_jax.step import compile_step, step_config, train_step  # noqa: E402

GLOBAL = 16


def global_batch(rng):
    """The same [GLOBAL, ...] batch in every process."""
    xy = rng.uniform(0, 24, (2, GLOBAL, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(24, 40, (2, GLOBAL, 2))], -1).astype(np.float32)
    images = rng.standard_normal((2, GLOBAL, 64, 64, 3)).astype(np.float32)
    return {"image1": images[0], "image2": images[1], "boxes1": boxes[0], "boxes2": boxes[1]}


def main():
    if PROCESSES > 1:
        parallel.initialize_distributed(f"127.0.0.1:{PORT}", PROCESSES, PROCESS)
    config = tiny.get_config()
    derived = config_lib.derive(config, jax.device_count(), num_examples=10 * GLOBAL)
    tx, schedule = config_lib.make_optimizer(config, derived)
    per_device = functools.partial(train_step, encoder=config_lib.make_encoder(config, derived), tx=tx, schedule=schedule,
                                   anchors=config_lib.anchors(config, derived.image_size),
                                   config=step_config(config))
    step_fn = compile_step(per_device, "pmap")
    state = parallel.replicate(initial_state(config, derived))
    rng = np.random.default_rng(0)
    share = GLOBAL // PROCESSES
    losses = []
    for _ in range(3):
        mine = {k: v[PROCESS * share:(PROCESS + 1) * share] for k, v in global_batch(rng).items()}
        batch = next(parallel.prefetch_to_device(iter([parallel.shard_batch(mine)])))
        state, metrics = step_fn(state, batch)
        losses.append(float(parallel.unreplicate(metrics)["loss"]))
    print("LOSSES", json.dumps(losses), flush=True)


if __name__ == "__main__":
    main()
