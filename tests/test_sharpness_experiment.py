"""End to end: experiments/paper/sharpness.py on a tiny F1 checkpoint written as the trainer
does.

The numbers it reports are checked against the library functions called directly on
the same parameters and subset, so the test covers the plumbing (config, restore,
subset, chunks, output files), not the numerics (tests/test_sharpness.py and
tests/test_noise_scale.py do those).
"""

import json

import jax
import numpy as np
import optax
import pytest

from experiments.paper import sharpness as experiment
from gbn_jax import models
from gbn_jax.research import sharpness
from gbn_jax.trainer import checkpointing, input_pipeline, noise_scale, steps

SMALL = ["--examples", "64", "--chunk", "32", "--noise_examples", "96", "--noise_chunk", "32"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    try:
        input_pipeline.get_dataset_info("fashion_mnist")
    except input_pipeline.DatasetNotFoundError as e:
        pytest.skip(f"Fashion-MNIST not available: {e}")
    workdir = tmp_path_factory.mktemp("run")
    model_fields = dict(norm="ghost", ghost_batch_size=16, width=8, num_hidden=2)
    config = {"dataset": "fashion_mnist", "data_dir": None, "variant": "lb_lr_gbn"}
    config["model"] = {"name": "f1", **model_fields}
    config["batch_size"] = 64
    (workdir / "config.json").write_text(json.dumps(config))
    model = models.get_model("f1", num_classes=10, **model_fields)
    state = steps.create_train_state(jax.random.PRNGKey(3), model, optax.sgd(0.1), (28, 28, 1))
    stats = jax.tree.map(lambda v: v + 0.5, state.batch_stats)  # not the init values
    state = state.replace(step=state.step + 7, batch_stats=stats)
    manager = checkpointing.make_manager(str(workdir), keep=3)
    checkpointing.save(manager, 7, state, {"epoch": 0, "step": 7})
    manager.wait_until_finished()
    manager.close()
    return workdir, model, state


def test_measures_a_checkpoint_and_writes_json_and_markdown(tiny_run, tmp_path):
    workdir, model, state = tiny_run
    argv = [str(workdir), *SMALL, "--top_k", "2", "--epsilon", "1e-3", "5e-4"]
    argv += ["--out", "tiny", "--results_dir", str(tmp_path)]
    assert experiment.main(argv) == 0
    record = json.loads((tmp_path / "tiny.json").read_text())
    assert "| run | step |" in (tmp_path / "tiny.md").read_text()
    (run,) = record["runs"]
    assert run["step"] == 7 and run["variant"] == "lb_lr_gbn"
    assert record["environment"]["load_average_end"]

    subset = experiment.training_subset("fashion_mnist", 96, seed=0)
    loss_fn = sharpness.model_loss(model, state.batch_stats)
    hessian_batches = sharpness.chunk_batches({k: v[:64] for k, v in subset.items()}, 32)
    want = sharpness.top_hessian_eigenvalues(loss_fn, state.params, hessian_batches, k=2, tol=1e-2)
    np.testing.assert_allclose(run["hessian"]["eigenvalues"], want.eigenvalues, rtol=1e-3)
    noise = noise_scale.subset_noise_scale(
        loss_fn, state.params, sharpness.chunk_batches(subset, 32)
    )
    np.testing.assert_allclose(run["noise_scale"]["b_simple"], noise.b_simple, rtol=1e-4)
    assert (run["noise_scale"]["batch_small"], run["noise_scale"]["batch_big"]) == (32, 96)
    boxes = run["epsilon_sharpness"]
    assert [b["epsilon"] for b in boxes] == [1e-3, 5e-4]
    assert all(b["sharpness"] >= 0 and b["num_starts"] == 3 for b in boxes)
    assert boxes[0]["sharpness"] > boxes[1]["sharpness"]  # a larger box rises higher
    for measured in (run["hessian"], run["noise_scale"], run["subset"], *boxes):
        assert measured["wall_time_sec"] > 0
    for measured in (run["hessian"], run["noise_scale"], *boxes):
        assert measured["cpu_time_sec"] > 0
    assert 0.0 <= run["subset"]["accuracy"] <= 1.0


def test_the_subset_is_fixed_by_its_seed():
    try:
        a = experiment.training_subset("fashion_mnist", 20, seed=1)
    except input_pipeline.DatasetNotFoundError as e:
        pytest.skip(f"Fashion-MNIST not available: {e}")
    b = experiment.training_subset("fashion_mnist", 20, seed=1)
    c = experiment.training_subset("fashion_mnist", 20, seed=2)
    np.testing.assert_array_equal(a["label"], b["label"])
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], c["image"])
    assert a["image"].dtype == np.float32 and a["image"].shape == (20, 28, 28, 1)


def test_the_subset_leaves_out_the_held_out_split_and_follows_the_run_input():
    from gbn_jax.trainer.data import sources

    try:
        subset = experiment.training_subset(
            "fashion_mnist", 300, seed=0, augment="authors", validation_size=10_000
        )
    except input_pipeline.DatasetNotFoundError as e:
        pytest.skip(f"Fashion-MNIST not available: {e}")
    held, _ = sources.load_arrays("fashion_mnist", "holdout", None, 10_000)
    held_bytes = {image.tobytes() for image in held}
    # The authors' input: mean 0.5, std 0.5, so pixels map back by x * 0.5 + 0.5.
    pixels = np.rint((subset["image"] * 0.5 + 0.5) * 255).astype(np.uint8)
    assert subset["image"].min() >= -1.0 and subset["image"].max() <= 1.0
    assert not any(image.tobytes() in held_bytes for image in pixels)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--chunk", "48"], "--chunk=48 must divide --examples=64"),
        (["--noise_examples", "32"], "at least twice"),
        (["--directions", "2"], r"--directions=2 must lie in \[0, --top_k=1\]"),
        (["--epsilon", "0"], "--epsilon"),
    ],
)
def test_bad_arguments_raise_value_errors(tiny_run, extra, match):
    workdir, _, _ = tiny_run
    with pytest.raises(ValueError, match=match):
        experiment.validate_args(experiment.parse_args([str(workdir), *SMALL, *extra]))


def test_missing_config_or_step_raise_value_errors(tiny_run, tmp_path):
    workdir, _, _ = tiny_run
    with pytest.raises(ValueError, match=r"has no config\.json"):
        experiment.validate_args(experiment.parse_args([str(tmp_path)]))
    with pytest.raises(ValueError, match=r"--step=3 is not saved .* holds \[7\]"):
        experiment.restore(str(workdir), 3)
