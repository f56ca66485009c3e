"""The only pmap-aware code: the device axis name, replication, batch sharding and multi-host start-up.

Per-device code talks to other devices only through `lax.pmean` / `lax.psum` / `lax.all_gather` on `AXIS`,
so the same function runs under `jax.pmap` (default) and under `jax.shard_map` over a 1-D mesh whose axis
has the same name.
"""
from __future__ import annotations

import collections
import itertools
import os
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

AXIS = "batch"

PyTree = Any


def local_mesh(devices: Optional[list] = None) -> jax.sharding.Mesh:
    """A 1-D mesh over the local devices with axis `AXIS` (what `pmap` maps over)."""
    return jax.sharding.Mesh(np.asarray(devices or jax.local_devices()), (AXIS,))


def replicate(tree: PyTree, devices: Optional[list] = None) -> PyTree:
    """Puts one copy of every leaf on each local device: [D, ...] arrays sharded over the devices.

    Each device receives the leaf directly (no [D, ...] host copy is built).
    """
    mesh = local_mesh(devices)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))

    def put(x):
        x = jnp.asarray(x)
        shards = [jax.device_put(x[None], d) for d in mesh.devices.flat]
        return jax.make_array_from_single_device_arrays((len(shards),) + x.shape, sharding, shards)

    return jax.tree.map(put, tree)


def unreplicate(tree: PyTree) -> PyTree:
    """The first device's copy of replicated state, fetched to host numpy.

    Reads the addressable shard of device 0 directly rather than indexing `x[0]`, which on pmap-sharded
    arrays dispatches a slicing computation per leaf.
    """

    def first(x):
        if isinstance(x, jax.Array) and len(x.addressable_shards) > 1:
            return np.asarray(x.addressable_shards[0].data)[0]
        return np.asarray(x)[0]

    return jax.tree.map(first, tree)


def shard_batch(batch: PyTree, local_devices: Optional[int] = None) -> PyTree:
    """Reshapes host arrays [local_devices * per_device, ...] to [local_devices, per_device, ...]."""
    count = local_devices or jax.local_device_count()

    def split(x):
        x = np.asarray(x)
        if x.shape[0] % count:
            raise ValueError(f"batch of {x.shape[0]} does not split over {count} local devices")
        return x.reshape((count, x.shape[0] // count) + x.shape[1:])

    return jax.tree.map(split, batch)


def prefetch_to_device(batches: Iterator[PyTree], size: int = 2, devices: Optional[list] = None) -> Iterator[PyTree]:
    """Keeps `size` host batches [D, B, ...] in flight to the devices while the current step runs.

    Transfers are asynchronous, so with size >= 2 the copy of batch n+1 overlaps step n.
    """
    sharding = jax.sharding.NamedSharding(local_mesh(devices), jax.sharding.PartitionSpec(AXIS))
    queue = collections.deque()

    def enqueue(count):
        for batch in itertools.islice(batches, count):
            queue.append(jax.tree.map(lambda x: jax.device_put(x, sharding), batch))

    enqueue(size)
    while queue:
        yield queue.popleft()
        enqueue(1)


def all_gather_batch(x: jnp.ndarray) -> jnp.ndarray:
    """Inside the per-device function: [B, ...] on each of D devices -> [D * B, ...] everywhere."""
    return jax.lax.all_gather(x, AXIS, tiled=True)


def initialize_distributed(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
) -> bool:
    """Starts `jax.distributed` when several processes are requested; a no-op for one process.

    Arguments fall back to the environment (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
    `JAX_PROCESS_ID`); under SLURM with no arguments JAX discovers them itself. One SLURM task per node
    drives every GPU of its node (JAX alone would give each task only the GPU numbered by its local rank,
    which is right only for one task per GPU).

    Returns:
      True if a multi-process runtime was started.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAX_PROCESS_ID"])
    under_slurm = "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if coordinator_address is None and not under_slurm:
        if num_processes not in (None, 1):
            raise ValueError("several processes need a coordinator address (--coordinator_address host:port)")
        return False
    # An empty list (not None) keeps every local device visible and stops JAX's one-device-per-task default.
    one_per_node = under_slurm and slurm_one_task_per_node(os.environ) and "JAX_LOCAL_DEVICE_IDS" not in os.environ
    local_device_ids = [] if one_per_node else None
    jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids=local_device_ids)
    return True


def slurm_one_task_per_node(environ) -> bool:
    """Whether a SLURM step runs one task on every node, from `SLURM_STEP_TASKS_PER_NODE` (e.g. "1(x4)";
    "8(x2)" or "2,1" are several tasks on a node)."""
    spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE", "")
    counts = [part.split("(")[0] for part in spec.split(",") if part]
    return bool(counts) and all(count == "1" for count in counts)
