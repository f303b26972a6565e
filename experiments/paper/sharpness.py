"""Sharpness and gradient noise scale of trained runs: Keskar's account of the gap.

Keskar et al. (2017) explain the generalization gap by large batches converging to
sharp minima; Hoffer et al. (2017) by the smaller number of updates. McCandlish et al.
(2018) predict the critical batch size by the gradient noise scale. For each trainer
workdir given, this restores a checkpoint (the latest, or ``--step``) and measures on a
fixed subset of the training set (the same examples for every run):

* the top Hessian eigenvalue(s) of the training loss (Lanczos on Hessian-vector
  products, ``gbn_jax.research.sharpness.top_hessian_eigenvalues``);
* Keskar's epsilon-sharpness for each ``--epsilon`` (``sharpness.epsilon_sharpness``:
  projected gradient ascent in the box from the first-order vertex and from where the
  Hessian's top eigenvector(s) leave the box, reusing the eigenvectors of the first
  measurement);
* the simple noise scale B_simple = tr(Sigma) / |G|^2 with B_small = ``--noise_chunk``
  and B_big = ``--noise_examples`` (``gbn_jax.trainer.noise_scale.subset_noise_scale``);

and the loss and accuracy on the subset. Every measurement records its wall time,
compilation included. Batch norm runs in eval mode (running statistics) unless
``--bn_mode=train``; the reasons are in the docstring of ``gbn_jax/research/sharpness.py``. In
train mode a plain batch norm normalizes over each chunk (``--chunk`` examples, and
``--noise_chunk`` for the noise scale), a ghost batch norm over its ghost batches.

The subset: the first ``--examples`` (and ``--noise_examples``) of a permutation of
the training examples drawn from ``--subset_seed``, without augmentation, normalized as
the run's input (its config's ``augment``), leaving out a held-out validation split
(its ``validation_size``): the same examples for every run of one setting.

Usage (from the repository root; a tiny F1 run to try it on):

  .venv/bin/python -m gbn_jax.main --config=configs/fashion_mnist_f1.py:lb,epochs_scale=0.02 \\
      --workdir=/tmp/f1run
  .venv/bin/python -m experiments.paper.sharpness /tmp/f1run --out sharpness_f1_tiny

  # the headline runs, all at once (one row each):
  .venv/bin/python -m experiments.paper.sharpness runs/table_full/*/seed0 --out sharpness_f1

Writes experiments/results/<out>.json (every number, the command, the machine and its
load) and <out>.md (the table).

References:
  Keskar, Mudigere, Nocedal, Smelyanskiy & Tang, ICLR 2017, section 2.2.2 and
  metric (3); McCandlish, Kaplan, Amodei et al., arXiv:1812.06162 (2018), section 2.2
  and appendix A.1; Hoffer, Hubara & Soudry (2017), sections 1 and 3.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import tqdm

from experiments.harness import provenance, tables
from experiments.harness.provenance import RESULTS_DIR

CONFIG_FILE = "config.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("workdirs", nargs="+", help="trainer workdirs (each with checkpoints/)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--examples", type=int, default=1024, help="subset for the Hessian and box")
    p.add_argument(
        "--chunk", type=int, default=1024, help="examples per chunk (lower it for conv nets)"
    )
    p.add_argument("--noise_examples", type=int, default=8192, help="subset, B_big")
    p.add_argument("--noise_chunk", type=int, default=128, help="B_small of the noise scale")
    p.add_argument("--subset_seed", type=int, default=0, help="permutation of the train split")
    p.add_argument("--bn_mode", default="eval", choices=("eval", "train"))
    p.add_argument("--top_k", type=int, default=1, help="Hessian eigenvalues to compute")
    # ARPACK's tol bounds the residual; the eigenvalue's own error is far smaller (on
    # the tiny F1 run 1e-2 gave lambda_max within 1.5e-4 of tol 1e-3, in 16 products
    # instead of 26).
    p.add_argument("--tol", type=float, default=1e-2, help="Lanczos relative tolerance")
    p.add_argument(
        "--epsilon",
        type=float,
        nargs="+",
        default=[1e-3],
        help="box sizes (Keskar et al. report 1e-3 and 5e-4: --epsilon 1e-3 5e-4)",
    )
    p.add_argument("--ascent_iterations", type=int, default=10, help="ascent steps per start")
    p.add_argument(
        "--directions",
        type=int,
        default=1,
        help="top Hessian eigenvectors that start the ascent (<= --top_k; 0: none)",
    )
    p.add_argument("--out", default="sharpness", help="output stem under --results_dir")
    p.add_argument("--results_dir", default=str(RESULTS_DIR))
    return p.parse_args(argv)


def validate_args(args: argparse.Namespace) -> None:
    """Fails before any compute; every message names the value and the fix."""
    for name in ("examples", "chunk", "noise_examples", "noise_chunk", "top_k"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)} must be positive.")
    if not 0 <= args.directions <= args.top_k:
        raise ValueError(
            f"--directions={args.directions} must lie in [0, --top_k={args.top_k}]: the "
            "ascent starts from the eigenvectors the Hessian measurement computed."
        )
    if args.examples % args.chunk:
        raise ValueError(
            f"--chunk={args.chunk} must divide --examples={args.examples}; e.g. "
            f"--examples={args.examples - args.examples % args.chunk or args.chunk}."
        )
    if args.noise_examples % args.noise_chunk or args.noise_examples < 2 * args.noise_chunk:
        raise ValueError(
            f"--noise_examples={args.noise_examples} must be a multiple of --noise_chunk="
            f"{args.noise_chunk}, at least twice it (B_big > B_small)."
        )
    if any(not (e > 0 and math.isfinite(e)) for e in args.epsilon):
        raise ValueError(f"--epsilon={args.epsilon} must all be positive, e.g. 1e-3 5e-4.")
    for workdir in args.workdirs:
        if not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
            raise ValueError(
                f"{workdir!r} has no {CONFIG_FILE}; pass directories the trainer "
                "(python -m gbn_jax.main) wrote."
            )


def training_subset(
    dataset: str,
    examples: int,
    seed: int,
    data_dir: str | None = None,
    *,
    augment: str = "default",
    validation_size: int = 0,
) -> dict[str, np.ndarray]:
    """The first ``examples`` of a seeded permutation of the training examples.

    Args:
      dataset: the config's dataset name (an in-memory one: MNIST family, CIFAR).
      examples: how many.
      seed: the permutation's seed (the same subset for every run).
      data_dir: the config's data_dir.
      augment: the config's input ("default" or "authors"): which normalization
        constants the run trained with. The subset itself is never augmented.
      validation_size: the config's held-out validation split; those examples are
        left out, as the run never trained on them.

    Returns:
      {"image": float32 (N, H, W, C), "label": int32 (N,)}, normalized as the trainer
      normalizes.

    Raises:
      ValueError: more examples than the training examples, or an unknown augment.
    """
    from gbn_jax.trainer import input_pipeline
    from gbn_jax.trainer.data import augment as augmentation
    from gbn_jax.trainer.data import sources

    if augment not in input_pipeline.AUGMENTS:
        raise ValueError(f"Unknown {augment=}; use one of {input_pipeline.AUGMENTS}.")
    spec = sources.spec_for(dataset, data_dir)
    if augment == "authors":
        spec = sources.authors_spec(spec)
    images, labels = sources.load_arrays(dataset, spec.train_split, data_dir, validation_size)
    if examples > len(labels):
        raise ValueError(
            f"{examples=} exceeds the {len(labels)} training examples of {dataset}; ask for fewer."
        )
    order = np.random.default_rng(seed).permutation(len(labels))[:examples]
    image = np.asarray(augmentation.normalize(images[order], spec.mean, spec.std), np.float32)
    return {"image": image, "label": labels[order].astype(np.int32)}


def subset_key(config: dict[str, Any]) -> tuple[str, str | None, str, int]:
    """What fixes a run's subset: dataset, data_dir, input normalization, held-out size."""
    return (
        config["dataset"],
        config.get("data_dir"),
        config.get("augment", "default"),
        int(config.get("validation_size", 0) or 0),
    )


def restore(workdir: str, step: int | None) -> tuple[int, Any, Any]:
    """(step, params, batch_stats) of a checkpoint of the workdir (latest by default)."""
    import orbax.checkpoint as ocp

    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False)
    )
    steps = sorted(manager.all_steps())
    if not steps:
        raise ValueError(f"No checkpoint under {directory}; train the run first.")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"--step={step} is not saved in {directory}; it holds {steps}.")
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    state = state["state"]
    return step, state["params"], state.get("batch_stats", {})


def measure_run(
    workdir: str, args: argparse.Namespace, subsets: dict[str, dict[str, np.ndarray]]
) -> dict[str, Any]:
    """Every measurement of one workdir, each with its wall time."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    from gbn_jax import models
    from gbn_jax.research import sharpness
    from gbn_jax.trainer import input_pipeline, noise_scale, steps

    start = time.perf_counter()
    with open(os.path.join(workdir, CONFIG_FILE)) as f:
        config = ml_collections.ConfigDict(json.load(f))
    info = input_pipeline.get_dataset_info(config.dataset, config.get("data_dir"))
    model_fields = {k: v for k, v in config.model.to_dict().items() if k != "name"}
    model = models.get_model(config.model.name, num_classes=info.num_classes, **model_fields)
    options = steps.compiler_options(config)

    t = time.perf_counter()
    step, params, batch_stats = restore(workdir, args.step)
    params, batch_stats = jax.device_put((params, batch_stats))
    restore_sec = time.perf_counter() - t

    loss_fn = sharpness.model_loss(model, batch_stats, bn_mode=args.bn_mode)
    batches = sharpness.chunk_batches(subsets["hessian"], args.chunk)
    noise_batches = sharpness.chunk_batches(subsets["noise"], args.noise_chunk)

    bar = tqdm.tqdm(desc=os.path.basename(os.path.normpath(workdir)), unit="pass", leave=False)

    def progress(what: str):
        def update(*_):
            bar.set_postfix_str(what, refresh=False)
            bar.update(1)

        return update

    def subset_metrics(params, batches):
        # The loss is the measured objective (the mean over chunks, in --bn_mode); the
        # accuracy is the model's as evaluated (running statistics).
        def chunk(batch):
            variables = {"params": params, "batch_stats": batch_stats}
            logits = model.apply(variables, batch["image"], train=False)
            correct = jnp.mean(jnp.argmax(logits, -1) == batch["label"], dtype=jnp.float32)
            return loss_fn(params, batch), correct

        losses, correct = jax.lax.map(chunk, batches)
        return jnp.mean(losses), jnp.mean(correct)

    t = time.perf_counter()
    subset_loss, accuracy = (float(v) for v in jax.jit(subset_metrics)(params, batches))
    subset_sec = time.perf_counter() - t

    # Traced in the options' context, as the trainer's programs are (steps.tracing).
    with steps.tracing(options):
        # CPU time of this process (all threads) next to each wall time: on a shared
        # machine the wall time depends on the other jobs, the CPU time much less.
        cpu = time.process_time()
        eig = sharpness.top_hessian_eigenvalues(
            loss_fn,
            params,
            batches,
            k=args.top_k,
            tol=args.tol,
            return_eigenvectors=True,
            compiler_options=options,
            callback=progress("hessian"),
        )
        eig_cpu = time.process_time() - cpu
        boxes = []
        for epsilon in args.epsilon:
            cpu = time.process_time()
            box = sharpness.epsilon_sharpness(
                loss_fn,
                params,
                batches,
                epsilon=epsilon,
                max_iterations=args.ascent_iterations,
                # The Hessian's top eigenvector(s) start the ascent (see --directions).
                directions=eig.eigenvectors[:, : args.directions] if args.directions else None,
                num_directions=0,
                compiler_options=options,
                callback=progress(f"eps={epsilon:g}"),
            )
            boxes.append({**dataclasses.asdict(box), "cpu_time_sec": time.process_time() - cpu})
        bar.set_postfix_str("noise scale")
        cpu = time.process_time()
        noise = noise_scale.subset_noise_scale(
            loss_fn, params, noise_batches, compiler_options=options
        )
        noise_cpu = time.process_time() - cpu
    bar.close()
    return {
        "workdir": os.path.abspath(workdir),
        "variant": config.get("variant"),
        "model": config.model.to_dict(),
        "batch_size": config.get("batch_size"),
        "step": step,
        "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "restore_sec": restore_sec,
        "subset": {"loss": subset_loss, "accuracy": accuracy, "wall_time_sec": subset_sec},
        "hessian": {
            "eigenvalues": [float(v) for v in eig.eigenvalues],
            "num_hvps": eig.num_hvps,
            "wall_time_sec": eig.wall_time_sec,
            "cpu_time_sec": eig_cpu,
        },
        "epsilon_sharpness": boxes,
        "noise_scale": {**dataclasses.asdict(noise), "cpu_time_sec": noise_cpu},
        "wall_time_sec": time.perf_counter() - start,
    }


def markdown(record: dict[str, Any]) -> str:
    """The table of one invocation: a row per run, then the settings."""
    settings = record["settings"]
    env = record["environment"]
    eps_cols = [f"phi eps={e:g} (%)" for e in settings["epsilon"]]
    header = [
        "run",
        "step",
        "subset loss",
        "subset acc",
        "lambda_max",
        *eps_cols,
        "B_simple",
        "Hessian s (CPU s)",
        "phi s (CPU s)",
        "noise s (CPU s)",
        "total s",
    ]
    rows = []
    for r in record["runs"]:
        boxes = r["epsilon_sharpness"]
        rows.append(
            [
                r["label"],
                r["step"],
                f"{r['subset']['loss']:.4f}",
                f"{r['subset']['accuracy']:.4f}",
                f"{r['hessian']['eigenvalues'][0]:.4g} ({r['hessian']['num_hvps']} HVPs)",
                *(f"{b['sharpness']:.4g}" for b in boxes),
                f"{r['noise_scale']['b_simple']:.4g}",
                _seconds(r["hessian"]),
                " + ".join(_seconds(b) for b in boxes),
                _seconds(r["noise_scale"]),
                f"{r['wall_time_sec']:.1f}",
            ]
        )
    lines = [
        "# Sharpness and gradient noise scale of trained runs",
        "",
        f"Command: `{env['command']}`  ",
        f"Date: {record['date']}; machine: {env['cpu']} ({env['cpu_count']} CPUs), "
        f"{env['device_kind']}; load average at start {_load(env['load_average_start'])}, "
        f"at end {_load(env['load_average_end'])}.",
        "",
        tables.markdown_table(header, rows),
        "",
        f"Batch norm in {settings['bn_mode']} mode. Hessian and epsilon-sharpness on "
        f"{settings['examples']} training examples (chunks of {settings['chunk']}, subset "
        f"seed {settings['subset_seed']}); lambda_max by Lanczos (tol {settings['tol']}); "
        f"phi: Keskar's epsilon-sharpness, projected ascent ({settings['ascent_iterations']} "
        f"iterations per start, {settings['directions']} curvature direction(s)), a lower "
        f"bound. B_simple = tr(Sigma)/|G|^2 from B_small = {settings['noise_chunk']} and "
        f"B_big = {settings['noise_examples']} (one subset: noisy when |G|^2 is small, see "
        "the JSON for both estimates). Wall times in seconds include compilation; in "
        "brackets the CPU time of the process over all its threads (2 cores: an idle "
        "machine runs the work in between half and all of it).",
        "",
    ]
    return "\n".join(lines)


def _seconds(measured: dict[str, Any]) -> str:
    return f"{measured['wall_time_sec']:.1f} ({measured['cpu_time_sec']:.1f})"


def _load(values: Sequence[float]) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    validate_args(args)
    env = provenance.environment("experiments.paper.sharpness", args)
    env["command"] = provenance.module_command("experiments.paper.sharpness", argv)
    configs = {}
    size = max(args.examples, args.noise_examples)
    cache: dict[tuple, dict[str, np.ndarray]] = {}
    runs = []
    for workdir in tqdm.tqdm(args.workdirs, desc="runs", unit="run"):
        with open(os.path.join(workdir, CONFIG_FILE)) as f:
            config = json.load(f)
        key = subset_key(config)
        if key not in cache:
            dataset, data_dir, augment, validation_size = key
            cache[key] = training_subset(
                dataset,
                size,
                args.subset_seed,
                data_dir,
                augment=augment,
                validation_size=validation_size,
            )
        full = cache[key]
        subsets = {
            "hessian": {k: v[: args.examples] for k, v in full.items()},
            "noise": {k: v[: args.noise_examples] for k, v in full.items()},
        }
        run = measure_run(workdir, args, subsets)
        run["label"] = os.path.relpath(workdir) if not os.path.isabs(workdir) else workdir
        run["subset_key"] = {
            "dataset": key[0],
            "augment": key[2],
            "validation_size": key[3],
        }
        runs.append(run)
        configs[run["label"]] = config
        tqdm.tqdm.write(
            f"{run['label']}: lambda_max={run['hessian']['eigenvalues'][0]:.4g} "
            f"({run['hessian']['wall_time_sec']:.1f} s), "
            + ", ".join(
                f"phi({b['epsilon']:g})={b['sharpness']:.4g} ({b['wall_time_sec']:.1f} s)"
                for b in run["epsilon_sharpness"]
            )
            + f", B_simple={run['noise_scale']['b_simple']:.4g} "
            f"({run['noise_scale']['wall_time_sec']:.1f} s), total {run['wall_time_sec']:.1f} s"
        )
    if len(cache) > 1:
        print(
            f"note: the runs differ in dataset, input normalization or held-out split "
            f"({sorted(cache, key=str)}), so they were measured on different subsets."
        )
    env["load_average_end"] = os.getloadavg()
    env["config"] = configs  # The measured runs' resolved configs, by label.
    record = {
        "date": env["date"],
        "settings": {k: v for k, v in vars(args).items() if k not in ("workdirs", "results_dir")},
        "environment": env,
        "runs": runs,
    }
    os.makedirs(args.results_dir, exist_ok=True)
    stem = os.path.join(args.results_dir, args.out)
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    with open(stem + ".md", "w") as f:
        f.write(markdown(record))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
