"""Tests of gbn_jax.research.sharpness against quadratics with a known Hessian and box maxima.

The references are closed forms or exhaustive searches in numpy: eigenvalues chosen
up front (A = Q diag(lambda) Q^T), np.linalg.eigvalsh of X^T X / n, a dense Hessian
from jax.hessian for a tiny network, the maximum of a separable quadratic over a box
coordinate by coordinate, and the maximum of a convex quadratic over every vertex.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from gbn_jax import models
from gbn_jax.research import sharpness


def _quadratic(a: np.ndarray, center: np.ndarray, offset: float = 0.0):
    """f(params) = 1/2 (w - c)^T A (w - c) + offset, w = ravel_pytree(params)."""
    a32, c32 = jnp.asarray(a, jnp.float32), jnp.asarray(center, jnp.float32)

    def loss(params, _):
        w = ravel_pytree(params)[0]
        return 0.5 * (w - c32) @ a32 @ (w - c32) + offset

    return loss


def _split_params(rng: np.random.Generator, n: int) -> dict:
    """A pytree of two leaves holding n parameters (exercises ravel_pytree)."""
    first = n // 3
    return {
        "kernel": jnp.asarray(rng.standard_normal((first,)), jnp.float32),
        "bias": jnp.asarray(rng.standard_normal((n - first,)), jnp.float32),
    }


def _matrix_with_spectrum(rng: np.random.Generator, eigenvalues: np.ndarray) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((eigenvalues.size, eigenvalues.size)))
    return (q * eigenvalues) @ q.T


def test_top_eigenvalues_of_a_quadratic_with_known_spectrum():
    rng = np.random.default_rng(0)
    n = 40
    spectrum = np.concatenate([[9.0, 7.5, 6.0], rng.uniform(-2.0, 4.0, n - 3)])
    loss = _quadratic(_matrix_with_spectrum(rng, spectrum), rng.standard_normal(n))
    got = sharpness.top_hessian_eigenvalues(
        loss, _split_params(rng, n), k=3, tol=1e-6, return_eigenvectors=True
    )
    np.testing.assert_allclose(got.eigenvalues, [9.0, 7.5, 6.0], rtol=1e-5)
    assert got.eigenvectors.shape == (n, 3)
    assert got.num_hvps > 0 and got.wall_time_sec > 0


def test_largest_magnitude_finds_a_negative_eigenvalue():
    rng = np.random.default_rng(1)
    n = 30
    spectrum = np.concatenate([[-8.0, 5.0], rng.uniform(-3.0, 3.0, n - 2)])
    loss = _quadratic(_matrix_with_spectrum(rng, spectrum), np.zeros(n))
    params = _split_params(rng, n)
    largest = sharpness.top_hessian_eigenvalues(loss, params, k=1, which="LA", tol=1e-6)
    by_magnitude = sharpness.top_hessian_eigenvalues(loss, params, k=2, which="LM", tol=1e-6)
    np.testing.assert_allclose(largest.eigenvalues, [5.0], rtol=1e-5)
    np.testing.assert_allclose(by_magnitude.eigenvalues, [-8.0, 5.0], rtol=1e-5)


def test_chunked_least_squares_hessian_is_the_data_covariance():
    rng = np.random.default_rng(2)
    n, d, chunk = 240, 12, 40
    x = rng.standard_normal((n, d)) * rng.uniform(0.2, 3.0, d)
    y = rng.standard_normal(n)
    batches = sharpness.chunk_batches(
        {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)}, chunk
    )

    def loss(params, batch):
        return 0.5 * jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)

    params = {"w": jnp.asarray(rng.standard_normal(d), jnp.float32)}
    got = sharpness.top_hessian_eigenvalues(loss, params, batches, k=2, tol=1e-6)
    want = np.linalg.eigvalsh(x.T @ x / n)[::-1][:2]
    np.testing.assert_allclose(got.eigenvalues, want, rtol=1e-4)
    hvp = sharpness.hessian_vector_product(loss, params, batches)
    v = rng.standard_normal(d)
    np.testing.assert_allclose(
        hvp({"w": jnp.asarray(v, jnp.float32)})["w"], x.T @ (x @ v) / n, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize(("norm", "bn_mode"), [("batch", "eval"), ("ghost", "train")])
def test_model_hessian_matches_a_dense_hessian(norm, bn_mode):
    """Lanczos on HVPs through the model (and GhostBatchNorm's custom VJP) against
    the eigenvalues of the dense Hessian of the same loss."""
    model = models.get_model(
        "f1", num_classes=3, norm=norm, ghost_batch_size=4, width=4, num_hidden=2
    )
    rng = np.random.default_rng(3)
    images = jnp.asarray(rng.standard_normal((16, 2, 2, 1)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 3, 16), jnp.int32)
    variables = model.init(jax.random.PRNGKey(0), images[:1], train=False)
    stats = jax.tree.map(
        lambda v: v + jnp.asarray(rng.uniform(0.2, 1.0, v.shape), v.dtype),
        variables["batch_stats"],
    )
    loss = sharpness.model_loss(model, stats, bn_mode=bn_mode)
    batches = sharpness.chunk_batches({"image": images, "label": labels}, 8)
    params = variables["params"]
    flat, unravel = ravel_pytree(params)

    chunks = [jax.tree.map(lambda b, i=i: b[i], batches) for i in range(2)]

    def flat_loss(w):
        return jnp.mean(jnp.stack([loss(unravel(w), chunk) for chunk in chunks]))

    dense = np.asarray(jax.jit(jax.hessian(flat_loss))(flat), np.float64)
    want = np.linalg.eigvalsh((dense + dense.T) / 2)[::-1][:2]
    got = sharpness.top_hessian_eigenvalues(loss, params, batches, k=2, tol=1e-6)
    np.testing.assert_allclose(got.eigenvalues, want, rtol=1e-3)


def test_model_loss_eval_mode_is_the_running_average_cross_entropy():
    model = models.get_model("f1", num_classes=4, width=6, num_hidden=1)
    rng = np.random.default_rng(4)
    images = jnp.asarray(rng.standard_normal((10, 3, 3, 1)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 4, 10), jnp.int32)
    variables = model.init(jax.random.PRNGKey(1), images[:1], train=False)
    loss = sharpness.model_loss(model, variables["batch_stats"])
    logits = np.asarray(model.apply(variables, images, train=False), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -np.mean(logp[np.arange(10), np.asarray(labels)])
    np.testing.assert_allclose(
        loss(variables["params"], {"image": images, "label": labels}), want, rtol=1e-5
    )


def _box(params, epsilon):
    x = np.asarray(ravel_pytree(params)[0], np.float64)
    return x, epsilon * (np.abs(x) + 1.0)


def _keskar(max_loss, loss0):
    return 100.0 * (max_loss - loss0) / (1.0 + loss0)


def test_epsilon_sharpness_of_a_separable_quadratic_in_a_large_box():
    """Diagonal A > 0: the maximum over the box is the better end of each coordinate."""
    rng = np.random.default_rng(5)
    n, epsilon = 50, 0.3
    diag = rng.uniform(0.5, 4.0, n)
    center = rng.standard_normal(n)
    params = _split_params(rng, n)
    x, r = _box(params, epsilon)
    per_coordinate = 0.5 * diag * np.maximum((x + r - center) ** 2, (x - r - center) ** 2)
    loss0 = 0.5 * np.sum(diag * (x - center) ** 2)
    got = sharpness.epsilon_sharpness(_quadratic(np.diag(diag), center), params, epsilon=epsilon)
    np.testing.assert_allclose(got.loss, loss0, rtol=1e-5)
    np.testing.assert_allclose(got.max_loss, per_coordinate.sum(), rtol=1e-5)
    np.testing.assert_allclose(got.sharpness, _keskar(per_coordinate.sum(), loss0), rtol=1e-4)


def test_epsilon_sharpness_of_a_quadratic_in_a_small_box_against_all_vertices():
    """A small box: the gradient picks the vertex, phi = 100 (g.y* + y*.A y*/2) / (1 + f)
    with y* = r sign(g); checked against every vertex of the box."""
    rng = np.random.default_rng(6)
    n, epsilon = 10, 1e-3
    a = _matrix_with_spectrum(rng, rng.uniform(0.1, 3.0, n))
    center = rng.standard_normal(n) * 2.0
    params = _split_params(rng, n)
    x, r = _box(params, epsilon)
    f = lambda w: 0.5 * (w - center) @ a @ (w - center)
    g = a @ (x - center)
    y_star = r * np.sign(g)
    closed_form = _keskar(f(x) + g @ y_star + 0.5 * y_star @ a @ y_star, f(x))
    vertices = np.array(list(itertools.product([-1.0, 1.0], repeat=n))) * r
    brute_force = _keskar(max(f(x + y) for y in vertices), f(x))
    assert closed_form == pytest.approx(brute_force, rel=1e-12)
    got = sharpness.epsilon_sharpness(_quadratic(a, center), params, epsilon=epsilon)
    np.testing.assert_allclose(got.sharpness, closed_form, rtol=1e-3)


def test_epsilon_sharpness_of_a_convex_quadratic_in_a_wide_box_against_all_vertices():
    """A convex function peaks at a vertex of the box; checked against all of them."""
    rng = np.random.default_rng(7)
    n, epsilon = 8, 0.5
    a = _matrix_with_spectrum(rng, np.array([6.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]))
    center = rng.standard_normal(n) * 0.1
    params = _split_params(rng, n)
    x, r = _box(params, epsilon)
    f = lambda w: 0.5 * (w - center) @ a @ (w - center) + 0.25
    vertices = np.array(list(itertools.product([-1.0, 1.0], repeat=n))) * r
    best = max(f(x + y) for y in vertices)
    got = sharpness.epsilon_sharpness(_quadratic(a, center, 0.25), params, epsilon=epsilon)
    np.testing.assert_allclose(got.max_loss, best, rtol=1e-4)
    np.testing.assert_allclose(got.sharpness, _keskar(best, f(x)), rtol=1e-4)


def test_epsilon_sharpness_of_a_concave_quadratic_peaks_inside_the_box():
    """f = 2 - (w - c)^T A (w - c) / 2 with c in the box: the maximum is f(c) = 2."""
    rng = np.random.default_rng(8)
    n, epsilon = 20, 0.2
    a = _matrix_with_spectrum(rng, rng.uniform(0.5, 2.0, n))
    params = _split_params(rng, n)
    x, r = _box(params, epsilon)
    center = x + rng.uniform(-0.5, 0.5, n) * r
    quad = _quadratic(a, center)
    loss = lambda p, b: 2.0 - quad(p, b)
    got = sharpness.epsilon_sharpness(loss, params, epsilon=epsilon, max_iterations=50)
    f0 = 2.0 - 0.5 * (x - center) @ a @ (x - center)
    np.testing.assert_allclose(got.max_loss, 2.0, rtol=1e-4)
    np.testing.assert_allclose(got.sharpness, _keskar(2.0, f0), rtol=1e-3)


def test_epsilon_sharpness_over_chunks_uses_the_mean_loss():
    rng = np.random.default_rng(9)
    n, d, epsilon = 60, 4, 0.05
    x = rng.standard_normal((n, d))
    y = rng.standard_normal(n)
    batches = sharpness.chunk_batches(
        {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(y, jnp.float32)}, 20
    )
    loss = lambda p, b: 0.5 * jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)
    w = rng.standard_normal(d)
    params = {"w": jnp.asarray(w, jnp.float32)}
    got = sharpness.epsilon_sharpness(loss, params, batches, epsilon=epsilon, max_iterations=30)
    # A convex quadratic again: the best vertex, by exhaustive search.
    r = epsilon * (np.abs(w) + 1.0)
    f = lambda v: 0.5 * np.mean((x @ v - y) ** 2)
    vertices = np.array(list(itertools.product([-1.0, 1.0], repeat=d))) * r
    np.testing.assert_allclose(got.max_loss, max(f(w + v) for v in vertices), rtol=1e-4)
    np.testing.assert_allclose(got.loss, f(w), rtol=1e-5)


def test_bad_inputs_raise_value_errors():
    loss = _quadratic(np.eye(4), np.zeros(4))
    params = {"w": jnp.ones(4)}
    with pytest.raises(ValueError, match="k=4"):
        sharpness.top_hessian_eigenvalues(loss, params, k=4)
    with pytest.raises(ValueError, match="k=0"):
        sharpness.top_hessian_eigenvalues(loss, params, k=0)
    with pytest.raises(ValueError, match="which='SA'"):
        sharpness.top_hessian_eigenvalues(loss, params, which="SA")
    with pytest.raises(ValueError, match="tol=-1"):
        sharpness.top_hessian_eigenvalues(loss, params, tol=-1.0)
    with pytest.raises(ValueError, match="ncv=2"):
        sharpness.top_hessian_eigenvalues(loss, params, k=2, ncv=2)
    with pytest.raises(ValueError, match="epsilon=0"):
        sharpness.epsilon_sharpness(loss, params, epsilon=0.0)
    with pytest.raises(ValueError, match="max_iterations=0"):
        sharpness.epsilon_sharpness(loss, params, max_iterations=0)
    with pytest.raises(ValueError, match="num_directions=-1"):
        sharpness.epsilon_sharpness(loss, params, num_directions=-1)
    with pytest.raises(ValueError, match="num_directions=4"):
        sharpness.epsilon_sharpness(loss, params, num_directions=4)
    with pytest.raises(ValueError, match=r"directions has shape \(3, 1\)"):
        sharpness.epsilon_sharpness(loss, params, directions=np.ones((3, 1)))
    with pytest.raises(ValueError, match="floating"):
        sharpness.epsilon_sharpness(loss, {"w": jnp.ones(4, jnp.int32)})
    with pytest.raises(ValueError, match="empty"):
        sharpness.top_hessian_eigenvalues(loss, {})
    with pytest.raises(ValueError, match="finite loss"):
        sharpness.epsilon_sharpness(lambda p, b: jnp.nan * jnp.sum(p["w"]), params)
    with pytest.raises(ValueError, match="bn_mode='test'"):
        sharpness.model_loss(models.get_model("f1", num_classes=2), {}, bn_mode="test")
    subset = {"image": np.zeros((10, 2)), "label": np.zeros(10)}
    with pytest.raises(ValueError, match="chunk_size=4 does not divide"):
        sharpness.chunk_batches(subset, 4)
    with pytest.raises(ValueError, match="chunk_size=0"):
        sharpness.chunk_batches(subset, 0)
    with pytest.raises(ValueError, match="different lengths"):
        sharpness.chunk_batches({"image": np.zeros((10, 2)), "label": np.zeros(9)}, 5)
    with pytest.raises(ValueError, match="leading"):
        sharpness.top_hessian_eigenvalues(
            lambda p, b: jnp.sum(p["w"] ** 2), params, {"a": np.zeros((2, 3)), "b": np.zeros((3,))}
        )


def test_epsilon_sharpness_at_an_exact_minimum_of_a_separable_quadratic():
    """Zero gradient, diagonal A: every vertex is a maximizer, phi = 100 sum a r^2 / 2."""
    rng = np.random.default_rng(10)
    n, epsilon = 16, 0.01
    diag = rng.uniform(0.5, 5.0, n)
    params = _split_params(rng, n)
    x, r = _box(params, epsilon)
    got = sharpness.epsilon_sharpness(_quadratic(np.diag(diag), x), params, epsilon=epsilon)
    np.testing.assert_allclose(got.loss, 0.0, atol=1e-9)
    np.testing.assert_allclose(got.sharpness, 100.0 * 0.5 * np.sum(diag * r**2), rtol=1e-4)


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_epsilon_sharpness_near_a_minimum_against_all_vertices(seed):
    """A small gradient and one dominant curvature direction (the case of a trained
    network): the ascent must leave the first-order vertex for the curvature's."""
    rng = np.random.default_rng(seed)
    n, epsilon = 10, 0.05
    spectrum = np.concatenate([[20.0], rng.uniform(0.0, 0.5, n - 1)])
    a = _matrix_with_spectrum(rng, spectrum)
    top = np.linalg.eigh(a)[1][:, -1]
    params = _split_params(rng, n)
    x, r = _box(params, epsilon)
    # The gradient lies in the flat directions, so its signs say nothing of the top one.
    offset = r * rng.standard_normal(n)
    center = x + 0.3 * (offset - top * (top @ offset))
    f = lambda w: 0.5 * (w - center) @ a @ (w - center)
    vertices = np.array(list(itertools.product([-1.0, 1.0], repeat=n))) * r
    best = max(f(x + y) for y in vertices)
    first_order = f(x + r * np.sign(a @ (x - center)))
    assert first_order < 0.9 * best  # the first-order vertex alone would fall short
    loss = _quadratic(a, center)
    got = sharpness.epsilon_sharpness(loss, params, epsilon=epsilon)
    np.testing.assert_allclose(got.max_loss, best, rtol=1e-4)
    np.testing.assert_allclose(got.sharpness, _keskar(best, f(x)), rtol=1e-4)
    assert got.num_starts == 3 and got.num_hvps > 0
    # The Hessian's own eigenvector (not the box-scaled one) as the start: no products.
    eig = sharpness.top_hessian_eigenvalues(loss, params, return_eigenvectors=True)
    reused = sharpness.epsilon_sharpness(loss, params, epsilon=epsilon, directions=eig.eigenvectors)
    np.testing.assert_allclose(reused.max_loss, best, rtol=1e-4)
    assert reused.num_starts == 3 and reused.num_hvps == 0


def test_epsilon_sharpness_is_a_lower_bound_for_a_general_quadratic():
    """Two comparable curvature directions: NP-hard in general; the ascent must stay
    within the box (never above the best vertex) and beat the first-order vertex."""
    rng = np.random.default_rng(14)
    n, epsilon = 10, 0.05
    a = _matrix_with_spectrum(rng, np.concatenate([[20.0, 8.0], rng.uniform(0, 1, n - 2)]))
    params = _split_params(rng, n)
    x, r = _box(params, epsilon)
    center = x + 0.1 * r * rng.standard_normal(n)
    f = lambda w: 0.5 * (w - center) @ a @ (w - center)
    vertices = np.array(list(itertools.product([-1.0, 1.0], repeat=n))) * r
    best = max(f(x + y) for y in vertices)
    got = sharpness.epsilon_sharpness(_quadratic(a, center), params, epsilon=epsilon)
    assert f(x + r * np.sign(a @ (x - center))) <= got.max_loss <= best * (1 + 1e-5)
    assert got.max_loss >= 0.9 * best
