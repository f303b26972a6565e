"""Is the input pipeline ever the bottleneck? Pipeline rate next to train-step rate.

For each case, in one process and interleaved round by round (so load from other jobs
hits both sides alike), it measures:

- pipeline: examples/s that `create_train_iterator` delivers, augmentation and
  normalization included, blocking on every batch's arrays;
- train step: examples/s that a jitted step (forward, backward, SGD-momentum update
  with weight decay and clipping; `gbn_jax.trainer.steps.make_train_step` when available)
  consumes on one fixed device batch;
- for the CIFAR case, the alternative design: grain doing the pad-4 crop and flip per
  example in numpy on the host, single-threaded (the reason small datasets are
  augmented on the device instead).

Cases: F1 on the real Fashion-MNIST (batch 4096) and ResNet-44 on mock 32x32 CIFAR-10
images (batch 512, pad-4 crop + flip). Medians over rounds; the target is pipeline >=
3x the train step.

Command (from the repository root):
    .venv/bin/python -m experiments.bench.input_rate
Writes experiments/results/bench_input.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from experiments.harness import provenance, tables, timing
from experiments.harness.provenance import RESULTS_DIR
from gbn_jax.trainer import input_pipeline
from gbn_jax.trainer.data import augment, sources

MODULE = "experiments.bench.input_rate"
RESULTS = str(RESULTS_DIR)


def make_step(model, image_shape):
    """Returns (jitted step, state, rng) for `model` with the regimes' kind of optimizer."""
    tx = optax.chain(
        optax.clip_by_global_norm(5.0),
        optax.add_decayed_weights(1e-4),
        optax.sgd(0.1, momentum=0.9),
    )
    try:
        from gbn_jax.trainer import steps

        state = steps.create_train_state(jax.random.key(0), model, tx, image_shape)
        # params0 aliases params; donation needs every leaf in its own buffer.
        state = jax.tree.map(jnp.copy, state)
        step = steps.make_train_step(model, tx, lambda count: 0.1)
        source = "gbn_jax.trainer.steps.make_train_step"
    except (ImportError, AttributeError, TypeError):
        state, step, source = _local_step(model, tx, image_shape)
    return jax.jit(step, donate_argnums=0), state, source


def _local_step(model, tx, image_shape):
    variables = model.init(jax.random.key(0), jnp.zeros((1, *image_shape)), train=False)
    state = (variables["params"], variables.get("batch_stats", {}), tx.init(variables["params"]))

    def step(state, batch, rng):
        params, stats, opt_state = state

        def loss_fn(params):
            logits, new = model.apply(
                {"params": params, "batch_stats": stats},
                batch["image"],
                train=True,
                rngs={"dropout": rng},
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
            return loss.mean(), new["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), stats, opt_state), {"loss": loss}

    return state, step, "local step (gbn_jax.trainer.train unavailable)"


def pipeline_rate(iterator, batches: int) -> float:
    jax.block_until_ready(next(iterator))  # Compile and warm caches outside the timing.
    seconds = sum(timing.time_calls(lambda: jax.block_until_ready(next(iterator)), batches))
    return batches * iterator.global_batch_size / seconds


def step_rate(step, state, batch, steps: int) -> tuple[float, object]:
    rng = jax.random.key(1)
    holder = {"state": state}

    def call() -> None:
        holder["state"], metrics = step(holder["state"], batch, rng)
        jax.block_until_ready(metrics)

    seconds = sum(timing.time_calls(call, steps))
    return steps * batch["label"].shape[0] / seconds, holder["state"]


class GrainHostCropFlip:
    """The alternative for small datasets: per-example numpy crop/flip in grain threads."""

    def __init__(self, images, labels, batch_size, seed, num_threads, spec):
        self.global_batch_size = batch_size
        self._images, self._labels, self._seed = images, labels, seed
        dataset = grain.MapDataset.source(np.arange(len(labels))).shuffle(seed).map(self._load)
        options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * batch_size)
        self._iter = iter(dataset.repeat().to_iter_dataset(options).batch(batch_size))
        self._normalize = jax.jit(lambda x: augment.normalize(x, spec.mean, spec.std))

    def _load(self, index):
        rng = np.random.default_rng((self._seed, int(index)))
        dy, dx = rng.integers(0, 9, size=2)
        padded = np.pad(self._images[index], ((4, 4), (4, 4), (0, 0)))
        image = padded[dy : dy + 32, dx : dx + 32]
        return (image[:, ::-1] if rng.random() < 0.5 else image), self._labels[index]

    def __next__(self):
        images, labels = next(self._iter)
        return {"image": self._normalize(images), "label": jax.device_put(labels)}


def run_case(name, iterators, model, image_shape, args, progress):
    step, state, step_source = make_step(model, image_shape)
    batch = next(iterators["pipeline"])
    _, state = step_rate(step, state, batch, 1)  # Compile.
    rates = {key: [] for key in (*iterators, "train_step")}
    for _ in range(args.rounds):
        for key, iterator in iterators.items():
            rates[key].append(pipeline_rate(iterator, args.pipeline_batches))
        rate, state = step_rate(step, state, batch, args.train_steps)
        rates["train_step"].append(rate)
        progress.update()
    medians = {key: statistics.median(values) for key, values in rates.items()}
    return {
        "case": name,
        "batch_size": int(batch["label"].shape[0]),
        "train_step_source": step_source,
        "rates": rates,
        "median_examples_per_s": medians,
        "pipeline_over_train_step": medians["pipeline"] / medians["train_step"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pipeline_batches", type=int, default=10)
    parser.add_argument("--train_steps", type=int, default=1)
    parser.add_argument("--cifar_examples", type=int, default=10240)
    args = parser.parse_args()
    from gbn_jax import models

    sharding = NamedSharding(
        jax.sharding.Mesh(np.asarray(jax.devices()), ("data",)), PartitionSpec("data")
    )
    results = []
    with tqdm(total=2 * args.rounds, desc="rounds") as progress:
        fmnist = input_pipeline.create_train_iterator(
            "fashion_mnist", global_batch_size=4096, seed=0, sharding=sharding
        )
        f1 = models.get_model("f1", num_classes=10)
        results.append(
            run_case("F1 / Fashion-MNIST", {"pipeline": fmnist}, f1, (28, 28, 1), args, progress)
        )

        data_dir = tempfile.mkdtemp()
        with tfds.testing.mock_data(num_examples=args.cifar_examples):
            cifar = input_pipeline.create_train_iterator(
                "cifar10", global_batch_size=512, seed=0, sharding=sharding, data_dir=data_dir
            )
        images, labels = sources.load_arrays("cifar10", "train", data_dir)
        spec = input_pipeline.KNOWN_DATASETS["cifar10"]
        # No reader threads: background prefetching would run during the other
        # measurements and flatter this one. Per example it costs the same with threads.
        grain_iter = GrainHostCropFlip(images, labels, 512, 0, 0, spec)
        resnet = models.get_model("resnet_cifar", num_classes=10, depth=44)
        results.append(
            run_case(
                "ResNet-44 / 32x32 (mock CIFAR-10)",
                {"pipeline": cifar, "grain_host_crop_flip": grain_iter},
                resnet,
                (32, 32, 3),
                args,
                progress,
            )
        )
    write(results, args)


def _alternative(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:,.0f}"


def write(results, args) -> None:
    meta = {
        **provenance.provenance(packages=(*provenance.PACKAGES, "grain")),
        "command": provenance.module_command(MODULE),
        "jax_devices": [str(d) for d in jax.devices()],
        "load_average_at_end": os.getloadavg(),
        "args": vars(args),
    }
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "bench_input.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    lines = [
        "# Input pipeline rate vs train-step rate",
        "",
        f"`{meta['command']}` on {meta['hardware']['cpu']} ({meta['hardware']['cpu_count']} "
        f"cores; {', '.join(meta['jax_devices'])}), jax {jax.__version__}; medians of "
        f"{args.rounds} interleaved rounds, examples/s.",
        "",
        tables.markdown_table(
            [
                *("case", "batch", "pipeline", "train step", "pipeline / train step"),
                "grain host crop+flip, 1 thread (alternative)",
            ],
            [
                [
                    r["case"],
                    r["batch_size"],
                    f"{r['median_examples_per_s']['pipeline']:,.0f}",
                    f"{r['median_examples_per_s']['train_step']:,.0f}",
                    f"{r['pipeline_over_train_step']:,.1f}x",
                    _alternative(r["median_examples_per_s"].get("grain_host_crop_flip")),
                ]
                for r in results
            ],
        ),
    ]
    lines += [
        "",
        f"Train step: {results[0]['train_step_source']}, SGD momentum 0.9, weight decay "
        "1e-4, clipping at global norm 5, float32. Pipeline: in-memory uint8, global batch "
        "assembled with make_array_from_process_local_data, crop/flip + normalize jitted.",
        f"Load average at the end: {meta['load_average_at_end']} (shared machine).",
    ]
    with open(os.path.join(RESULTS, "bench_input.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
