"""jattn.policy.kmeans against scikit-learn's KMeans on the same data, and its contract:
pure (same key, same result), jittable, usable in a compiled loop, vmappable over
independent problems, clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs

from jattn.policy.kmeans import KMeansResult, kmeans


def _same_partition(a, b) -> bool:
    """Labels equal up to a permutation of the cluster ids."""
    a, b = np.asarray(a), np.asarray(b)
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def _blobs(std, seed=0, n=400, d=8, centers=5):
    x, _ = make_blobs(n, n_features=d, centers=centers, cluster_std=std, random_state=seed)
    return x.astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1])
def test_partition_equals_sklearn_on_separated_blobs(seed):
    """Well-separated blobs have one optimum: the same partition as scikit-learn (breaks on
    a wrong distance, assignment or centre update)."""
    x = _blobs(0.6, seed)
    ref = KMeans(5, n_init=10, random_state=seed).fit(x)
    got = kmeans(x, 5, jax.random.key(seed))
    assert _same_partition(got.labels, ref.labels_)
    assert abs(float(got.inertia) / ref.inertia_ - 1) < 1e-4
    # centroids are the means of their points, labels the nearest centroid
    c = np.asarray(got.centroids)
    lab = np.asarray(got.labels)
    for j in range(5):
        np.testing.assert_allclose(c[j], x[lab == j].mean(0), rtol=1e-4, atol=1e-4)
    d = ((x[:, None] - c[None]) ** 2).sum(-1)
    assert (d.argmin(1) == lab).all()


@pytest.mark.parametrize("std,k", [(3.0, 5), (6.0, 4)])
def test_inertia_within_one_percent_of_sklearn(std, k):
    """Overlapping clusters (several local optima): with n_init=10 restarts the inertia is
    within 1 % of scikit-learn's (breaks on a wrong k-means++ seeding or restart choice)."""
    x = _blobs(std, 3, centers=k + 1)
    ref = KMeans(k, n_init=10, random_state=0).fit(x)
    got = kmeans(x, k, jax.random.key(0), n_init=10)
    assert abs(float(got.inertia) / ref.inertia_ - 1) < 0.01, (float(got.inertia), ref.inertia_)


def test_self_attention_like_rows_match_sklearn_inertia():
    """Rows of a row-stochastic affinity matrix (what self-segmentation clusters), k=5,
    n_init=10: inertia within 1 % of scikit-learn's."""
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 5, 256)
    base = rng.random((5, 256)) ** 4
    x = base[groups] + 0.3 * rng.random((256, 256))
    x = (x / x.sum(1, keepdims=True)).astype(np.float32)
    ref = KMeans(5, n_init=10, random_state=1).fit(x)
    got = kmeans(x, 5, jax.random.key(1))
    assert abs(float(got.inertia) / ref.inertia_ - 1) < 0.01
    assert _same_partition(got.labels, groups)


def test_restarts_keep_the_best_and_same_key_same_result():
    x = _blobs(4.0, 5)
    one = [float(kmeans(x, 6, jax.random.key(s), n_init=1).inertia) for s in range(6)]
    best = kmeans(x, 6, jax.random.key(0), n_init=8)
    assert float(best.inertia) <= np.median(one) * (1 + 1e-6)
    again = kmeans(x, 6, jax.random.key(0), n_init=8)
    assert np.array_equal(best.labels, again.labels)
    assert isinstance(best, KMeansResult) and best.labels.dtype == jnp.int32
    assert best.centroids.shape == (6, 8) and best.centroids.dtype == jnp.float32
    assert 1 <= int(best.n_iter) <= 300


def test_jit_scan_and_vmap_agree_with_eager():
    """Usable inside a compiled loop and batched over independent problems: each problem
    of a vmapped batch, and each step of a scan, gives the eager result."""
    xs = np.stack([_blobs(0.8, s, n=120, d=4, centers=3) for s in range(3)])
    keys = jax.random.split(jax.random.key(7), 3)
    eager = [kmeans(xs[i], 3, keys[i], n_init=3) for i in range(3)]

    batched = jax.jit(jax.vmap(lambda x, k: kmeans(x, 3, k, n_init=3)))(xs, keys)

    def body(carry, inp):
        x, k = inp
        r = kmeans(x, 3, k, n_init=3)
        return carry + r.inertia, r.labels

    total, labels = jax.jit(lambda xs, ks: jax.lax.scan(body, jnp.float32(0), (xs, ks)))(
        xs, keys)
    for i in range(3):
        assert np.array_equal(batched.labels[i], eager[i].labels)
        assert np.array_equal(labels[i], eager[i].labels)
        np.testing.assert_allclose(batched.inertia[i], eager[i].inertia, rtol=1e-5)
    np.testing.assert_allclose(total, sum(float(r.inertia) for r in eager), rtol=1e-5)


def test_traced_tol_and_max_iter_bound():
    x = _blobs(5.0, 2)
    r = jax.jit(lambda t: kmeans(x, 5, jax.random.key(0), tol=t, max_iter=2))(0.0)
    assert int(r.n_iter) <= 2


def test_errors_name_the_argument():
    x = np.zeros((10, 3), np.float32)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"^k \(the number of clusters\)"):
        kmeans(x, 1, key)
    with pytest.raises(ValueError, match=r"k=11 .*N=10"):
        kmeans(x, 11, key)
    with pytest.raises(ValueError, match="^x must be 2-D"):
        kmeans(np.zeros(10, np.float32), 2, key)
    with pytest.raises(ValueError, match="^n_init"):
        kmeans(x, 2, key, n_init=0)
    with pytest.raises(ValueError, match="^max_iter"):
        kmeans(x, 2, key, max_iter=0)
    with pytest.raises(ValueError, match="^tol"):
        kmeans(x, 2, key, tol=-1.0)


def test_duplicate_points_fill_every_cluster():
    """Exactly k distinct points, each repeated: every cluster is one distinct point,
    inertia 0."""
    x = np.repeat(np.eye(4, dtype=np.float32) * 5, 10, axis=0)
    r = kmeans(x, 4, jax.random.key(3), n_init=2)
    assert float(r.inertia) < 1e-6
    assert len(set(np.asarray(r.labels).tolist())) == 4


def test_empty_cluster_moves_to_the_farthest_point():
    """A centre that no point is nearest to is moved onto the point farthest from its own
    centre (scikit-learn's relocation), so no cluster stays empty."""
    from jattn.policy.kmeans import _lloyd

    x = jnp.asarray(np.array([[0, 0], [0, 1], [10, 0], [10, 1]], np.float32))
    far_away = jnp.asarray(np.array([[5, 0.5], [100, 100]], np.float32))
    c, labels, inertia, _ = _lloyd(x, jnp.sum(x * x, -1), far_away, 50, jnp.float32(0))
    assert len(set(np.asarray(labels).tolist())) == 2
    np.testing.assert_allclose(float(inertia), 1.0, atol=1e-5)
