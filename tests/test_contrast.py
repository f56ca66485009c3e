"""Momentum contrast maths against numpy written from the definitions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from insloc_jax import contrast


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_momentum_update_is_an_exponential_moving_average():
    rng = np.random.default_rng(0)
    key = {"conv": rng.standard_normal((3, 3)), "bn": {"scale": rng.standard_normal(4)}}
    query = {"conv": rng.standard_normal((3, 3)), "bn": {"scale": rng.standard_normal(4)}}
    out = contrast.momentum_update(key, query, 0.999)
    np.testing.assert_allclose(out["conv"], 0.999 * key["conv"] + 0.001 * query["conv"], rtol=1e-6)
    np.testing.assert_allclose(out["bn"]["scale"], 0.999 * key["bn"]["scale"] + 0.001 * query["bn"]["scale"],
                               rtol=1e-6)


def test_infonce_matches_numpy_cross_entropy():
    rng = np.random.default_rng(1)
    q = _unit(rng.standard_normal((6, 2, 8))).astype(np.float32)
    k = _unit(rng.standard_normal((6, 2, 8))).astype(np.float32)
    queue = _unit(rng.standard_normal((2, 16, 8))).astype(np.float32)
    logits = contrast.infonce_logits(q, k, queue, 0.2)
    loss, metrics = contrast.infonce_loss(logits)
    want_logits = np.zeros((6, 2, 17))
    for b in range(6):
        for level in range(2):
            want_logits[b, level, 0] = q[b, level] @ k[b, level] / 0.2
            want_logits[b, level, 1:] = queue[level] @ q[b, level] / 0.2
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
    log_z = np.log(np.exp(want_logits).sum(-1))
    per_level = (log_z - want_logits[..., 0]).mean(0)
    np.testing.assert_allclose(metrics["loss"], per_level, rtol=1e-5)
    assert float(loss) == pytest.approx(per_level.sum(), rel=1e-5)
    np.testing.assert_allclose(metrics["top1"], (want_logits.argmax(-1) == 0).mean(0))


def test_loss_at_random_initialisation_is_log_k_plus_one():
    # Random unit vectors in dimension D give cosines of variance 1/D, so logits ~ N(0, 1 / (D T^2)) and the
    # loss is log(K + 1) plus the log-normal mean correction sigma^2 / 2 (0.098 here).
    rng = jax.random.split(jax.random.PRNGKey(0), 3)
    queue = contrast.init_queues(rng[0], 1, 4096, 128)
    q = _unit(np.asarray(jax.random.normal(rng[1], (64, 1, 128))))
    k = _unit(np.asarray(jax.random.normal(rng[2], (64, 1, 128))))
    loss, _ = contrast.infonce_loss(contrast.infonce_logits(q, k, queue, 0.2))
    assert float(loss) == pytest.approx(np.log(4097) + 0.5 / (128 * 0.2**2), abs=0.05)
    np.testing.assert_allclose(np.linalg.norm(queue, axis=-1), 1.0, rtol=1e-5)


def test_no_gradient_into_keys_or_queue():
    rng = np.random.default_rng(2)
    q, k = _unit(rng.standard_normal((4, 1, 8))), _unit(rng.standard_normal((4, 1, 8)))
    queue = _unit(rng.standard_normal((1, 8, 8)))
    grads = jax.grad(lambda q, k, queue: contrast.infonce_loss(contrast.infonce_logits(q, k, queue, 0.2))[0],
                     argnums=(0, 1, 2))(q, k, queue)
    assert np.any(np.asarray(grads[0]) != 0)
    assert np.all(np.asarray(grads[1]) == 0) and np.all(np.asarray(grads[2]) == 0)


def test_enqueue_fifo_with_wrap_around():
    levels, size, dim, batch = 2, 12, 3, 4
    queue = np.zeros((levels, size, dim), np.float32)
    reference = queue.copy()
    pointer = jnp.int32(0)
    ref_pointer = 0
    for step in range(5):  # 20 keys into 12 rows: wraps once
        keys = np.full((batch, levels, dim), step + 1, np.float32) + np.arange(levels)[None, :, None] * 10
        queue, pointer = contrast.enqueue(jnp.asarray(queue), jnp.asarray(keys), pointer)
        for i in range(batch):
            reference[:, (ref_pointer + i) % size] = keys[i]
        ref_pointer = (ref_pointer + batch) % size
        np.testing.assert_array_equal(queue, reference)
        assert int(pointer) == ref_pointer
    with pytest.raises(ValueError, match="multiple of the global batch"):
        contrast.enqueue(jnp.asarray(queue), jnp.zeros((5, levels, dim)), pointer)


def test_batch_negatives_are_every_other_key_of_the_global_batch_in_order():
    rng = np.random.default_rng(3)
    n, levels, dim, size = 6, 2, 5, 4
    batch_keys = rng.normal(size=(n, levels, dim))
    query, queue = rng.normal(size=(3, levels, dim)), rng.normal(size=(levels, size, dim))
    own = np.array([2, 3, 5])  # this device holds global samples 2, 3 and 5
    logits = np.asarray(contrast.infonce_logits(jnp.asarray(query), jnp.asarray(batch_keys[own]),
                                                jnp.asarray(queue), 0.5, batch_keys=jnp.asarray(batch_keys),
                                                own=jnp.asarray(own)))
    assert logits.shape == (3, levels, 1 + size + n - 1)
    for b in range(3):
        for level in range(levels):
            want = ([query[b, level] @ batch_keys[own[b], level]]
                    + [query[b, level] @ queue[level, k] for k in range(size)]
                    + [query[b, level] @ batch_keys[j, level] for j in range(n) if j != own[b]])
            np.testing.assert_allclose(logits[b, level], np.array(want) / 0.5, rtol=1e-5, atol=1e-5)
    # Without batch keys the logits are the paper's: the same first 1 + K columns.
    plain = contrast.infonce_logits(jnp.asarray(query), jnp.asarray(batch_keys[own]), jnp.asarray(queue), 0.5)
    np.testing.assert_allclose(np.asarray(plain), logits[..., :1 + size], rtol=1e-6)
