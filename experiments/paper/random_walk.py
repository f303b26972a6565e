"""Random walk on a random potential: ultra-slow diffusion d ~ (log t)^(1/gamma).

The paper explains why ||w_t - w_0|| grows like log t: if the loss is a random
potential whose roughness grows with distance, std(L(x) - L(x0)) ~ |x - x0|^gamma, a
walker that has gone a distance d has had to cross barriers of height ~ d^gamma, which
takes a time ~ exp(d^gamma / T); hence d ~ (T log t)^(1/gamma) instead of the d ~ t^(1/2)
of free diffusion. This script simulates that model in one dimension:

* potentials: fractional Brownian motion (fBm) with Hurst exponent H = gamma, sampled
  exactly on a lattice by circulant embedding (Davies-Harte), one independent potential
  per walker, std of a one-site increment = 1 (the energy unit);
* dynamics: Metropolis at temperature T, a move to a random neighbour accepted with
  probability min(1, exp(-dV / T)); infinite walls at the lattice ends, and the run
  checks that no walker ever reached them;
* measurement: d(t) = mean over walkers of |x_t - x_0| at log-spaced t, the exponent nu
  of d ~ (log t)^nu as the slope of log d against log log t over the late-time range,
  with a bootstrap over walkers (= over potential realizations), and the power-law
  exponent alpha of d ~ t^alpha for comparison.

gamma = 1 needs care. fBm with H = 1 has perfectly correlated increments: each
realization is a straight line V(x) = Z x with a random slope Z. It has no barriers at
all, so walkers drift downhill ballistically (d ~ t) and the barrier argument does not
apply. The paper's gamma = 1 is the limit H -> 1 from below, where the potential is
still self-similar with barriers at every scale, but ever more dominated by a local
tilt. So the gamma ~ 1 row uses H = 0.9, and H = 1 exactly is run as well (as a tilt,
without a lattice) to show the ballistic drift that a pure linear potential gives.

Usage (from the repository root):
  .venv/bin/python -m experiments.paper.random_walk            # default, a few minutes on 2 CPUs
  .venv/bin/python -m experiments.paper.random_walk --quick    # smoke run, under a minute

Outputs: experiments/results/random_walk.{png,md,json}.

References:
  Hoffer, Hubara & Soudry (2017), Section 3 ("random walk on a random potential");
  Sinai (1982) for H = 1/2, d ~ (log t)^2; Marinari et al. (1983); Bouchaud & Georges
  (1990) for the general H; Davies & Harte (1987) for the sampler.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from experiments.harness import provenance, tables
from experiments.harness.provenance import RESULTS_DIR
from gbn_jax.research import analysis

# Steps per lax.scan block; longer blocks amortize drawing random bits (measured ~1.5x
# faster per step than one draw per step on CPU). Short remainders use the smaller sizes.
BLOCK_SIZES = (256, 16, 1)


# ---------------------------------------------------------------------------------------
# Potentials.


def fgn_autocovariance(num_lags: int, hurst: float) -> np.ndarray:
    """Autocovariance of unit fractional Gaussian noise (the increments of fBm).

    Args:
      num_lags: Number of lags k = 0 .. num_lags - 1 to return.
      hurst: Hurst exponent H in (0, 1].

    Returns:
      r(k) = (|k+1|^2H - 2|k|^2H + |k-1|^2H) / 2, float64 of shape (num_lags,).

    References:
      Davies & Harte (1987); Mandelbrot & Van Ness (1968).
    """
    k = np.arange(num_lags, dtype=np.float64)
    two_h = 2.0 * hurst
    return 0.5 * (np.abs(k + 1) ** two_h - 2.0 * k**two_h + np.abs(k - 1) ** two_h)


def fbm_potentials(key: jax.Array, num: int, length: int, hurst: float) -> jax.Array:
    """Samples independent fBm paths on a lattice by circulant embedding (Davies-Harte).

    The increments (fractional Gaussian noise) are exact: their covariance matrix is
    embedded in a circulant of size 2 * length whose eigenvalues are non-negative for
    every H in (0, 1], so an FFT of scaled complex Gaussian noise reproduces it. For
    H = 1 the embedding has one non-zero eigenvalue and each path is a straight line
    with a random slope.

    Args:
      key: PRNG key.
      num: Number of independent paths (one per walker).
      length: Lattice sites per path.
      hurst: Hurst exponent H in (0, 1].

    Returns:
      float32 array (num, length) with V[:, 0] = 0 and
      E[(V[:, x + r] - V[:, x])^2] = r^(2H).

    Raises:
      ValueError: If H is outside (0, 1] or length < 2.

    References:
      Davies & Harte (1987), "Tests for Hurst effect", Biometrika 74(1).
    """
    if not 0.0 < hurst <= 1.0:
        raise ValueError(f"{hurst=} must lie in (0, 1]; H = gamma is the roughness exponent.")
    if length < 2:
        raise ValueError(f"{length=} must be at least 2 lattice sites.")
    n = length - 1  # Number of increments.
    r = fgn_autocovariance(n + 1, hurst)
    circulant_row = np.concatenate([r, r[n - 1 : 0 : -1]])  # Size 2n.
    eigenvalues = np.fft.fft(circulant_row).real
    if eigenvalues.min() < -1e-8 * eigenvalues.max():
        raise ValueError(f"Circulant embedding is not non-negative for {hurst=}.")
    scale = jnp.asarray(np.sqrt(np.clip(eigenvalues, 0.0, None) / (2 * n)), jnp.float32)
    real_key, imag_key = jax.random.split(key)
    noise = jax.random.normal(real_key, (num, 2 * n)) + 1j * jax.random.normal(
        imag_key, (num, 2 * n)
    )
    increments = jnp.fft.fft(scale * noise, axis=-1).real[:, :n]
    return jnp.concatenate([jnp.zeros((num, 1)), jnp.cumsum(increments, axis=-1)], axis=-1)


def structure_function_exponent(
    potentials: np.ndarray, max_lag: int, rng: np.random.Generator, num_bootstrap: int
) -> tuple[float, float]:
    """Measures H from the potentials: E[(V(x+r) - V(x))^2] ~ r^(2H).

    Args:
      potentials: (num, length) sampled potentials.
      max_lag: Largest lag r used (lags are log-spaced from 1).
      rng: numpy Generator for the bootstrap.
      num_bootstrap: Bootstrap resamples over potentials for the uncertainty.

    Returns:
      (H estimate, bootstrap standard deviation).

    References:
      Hoffer, Hubara & Soudry (2017), Section 3: std(L(w) - L(w0)) ~ ||w - w0||^gamma.
    """
    lags = np.unique(np.geomspace(1, max_lag, 16).astype(int))
    per_path = np.stack(
        [np.mean((potentials[:, lag:] - potentials[:, :-lag]) ** 2, axis=1) for lag in lags],
        axis=1,
    )  # (num, lags)

    def exponent(curve: np.ndarray) -> float:
        return analysis.fit_power_law(lags, curve).params["alpha"] / 2.0

    weights = rng.multinomial(
        per_path.shape[0], np.full(per_path.shape[0], 1 / per_path.shape[0]), num_bootstrap
    )
    samples = [exponent(w @ per_path / per_path.shape[0]) for w in weights]
    return exponent(per_path.mean(axis=0)), float(np.std(samples))


# ---------------------------------------------------------------------------------------
# Dynamics.


def _metropolis_step(carry, bits, potentials, temperature):
    """One Metropolis move for every walker; `bits` supply direction and acceptance."""
    position, energy, start, excursion = carry
    proposal = position + jnp.where(bits & 1, 1, -1)
    if potentials is None:
        position = proposal  # Free diffusion: every move is accepted.
    else:
        if potentials.ndim == 1:  # H = 1: V(x) = slope * (x - x0), no lattice needed.
            new_energy = potentials * (proposal - start).astype(jnp.float32)
        else:
            new_energy = jnp.take_along_axis(potentials, proposal[:, None], axis=1)[:, 0]
        uniform = (bits >> 1).astype(jnp.float32) * (2.0**-31)
        # Walls are +inf, so exp(-inf) = 0 rejects every move into them.
        accept = uniform < jnp.exp((energy - new_energy) / temperature)
        position = jnp.where(accept, proposal, position)
        energy = jnp.where(accept, new_energy, energy)
    excursion = jnp.maximum(excursion, jnp.abs(position - start))
    return (position, energy, start, excursion), None


@functools.partial(jax.jit, static_argnames=("block_size", "temperature"))
def advance(carry, potentials, key, num_blocks, *, block_size: int, temperature: float):
    """Runs num_blocks * block_size Metropolis steps for all walkers.

    Args:
      carry: (position, energy, start, max excursion), each of shape (walkers,).
      potentials: (walkers, length) potentials with +inf walls, (walkers,) slopes of a
        linear potential, or None for free diffusion.
      key: PRNG key for this call.
      num_blocks: Number of blocks (traced, so one compilation serves every segment).
      block_size: Steps per block, scanned with lax.scan.
      temperature: Metropolis temperature T.

    Returns:
      The carry after the steps.

    References:
      Metropolis et al. (1953); Hoffer, Hubara & Soudry (2017), Section 3.
    """
    num_walkers = carry[0].shape[0]
    step = functools.partial(_metropolis_step, potentials=potentials, temperature=temperature)

    def block(i, state):
        bits = jax.random.bits(jax.random.fold_in(key, i), (block_size, num_walkers), jnp.uint32)
        return jax.lax.scan(step, state, bits)[0]

    return jax.lax.fori_loop(0, num_blocks, block, carry)


def simulate(
    potentials: jax.Array | None,
    num_walkers: int,
    sample_times: np.ndarray,
    temperature: float,
    key: jax.Array,
    label: str,
) -> tuple[np.ndarray, int]:
    """Runs all walkers to sample_times[-1] and records |x_t - x_0| at each sample time.

    Args:
      potentials: (walkers, length) potentials with walls, (walkers,) slopes of a linear
        potential, or None for free diffusion.
      num_walkers: Number of walkers.
      sample_times: Increasing positive integer times at which to record.
      temperature: Metropolis temperature T.
      key: PRNG key.
      label: Name shown on the progress bar.

    Returns:
      (|x_t - x_0| as a (walkers, len(sample_times)) array, largest |x_t - x_0| reached
      at any step by any walker).
    """
    if potentials is None or potentials.ndim == 1:
        start = jnp.zeros((num_walkers,), jnp.int32)
        energy = jnp.zeros((num_walkers,), jnp.float32)
    else:
        start = jnp.full((num_walkers,), potentials.shape[1] // 2, jnp.int32)
        energy = potentials[:, potentials.shape[1] // 2]
    carry = (start, energy, start, jnp.zeros((num_walkers,), jnp.int32))
    displacements = np.zeros((num_walkers, sample_times.size), np.float64)
    now, calls = 0, 0
    with tqdm(total=int(sample_times[-1]), desc=label, unit="step", leave=False) as bar:
        for index, target in enumerate(sample_times):
            remaining = int(target) - now
            for block_size in BLOCK_SIZES:
                num_blocks, remaining = divmod(remaining, block_size)
                if num_blocks:
                    call_key = jax.random.fold_in(key, calls)
                    carry = advance(
                        carry,
                        potentials,
                        call_key,
                        num_blocks,
                        block_size=block_size,
                        temperature=temperature,
                    )
                    calls += 1
            displacements[:, index] = np.abs(np.asarray(carry[0] - carry[2]))
            bar.update(int(target) - now)
            now = int(target)
    return displacements, int(np.max(np.asarray(carry[3])))


# ---------------------------------------------------------------------------------------
# Fits.


def bootstrap_fits(
    sample_times: np.ndarray,
    displacements: np.ndarray,
    t_min: float,
    rng: np.random.Generator,
    num_bootstrap: int,
) -> dict:
    """Fits nu (d ~ (log t)^nu) and alpha (d ~ t^alpha) over t >= t_min, with bootstrap.

    The bootstrap resamples walkers, i.e. potential realizations, which are independent;
    the least-squares errors of one curve are not, because d(t) at nearby t share history.

    Args:
      sample_times: (n,) sample times.
      displacements: (walkers, n) |x_t - x_0|.
      t_min: Start of the late-time fitting range.
      rng: numpy Generator.
      num_bootstrap: Number of resamples.

    Returns:
      Dict with the point estimates, bootstrap standard deviations and 95% intervals.

    References:
      Hoffer, Hubara & Soudry (2017), Section 3.
    """
    keep = sample_times >= t_min
    t, per_walker = sample_times[keep], displacements[:, keep]
    num_walkers = per_walker.shape[0]
    weights = rng.multinomial(num_walkers, np.full(num_walkers, 1 / num_walkers), num_bootstrap)
    curves = weights @ per_walker / num_walkers

    def fits(d: np.ndarray) -> tuple[float, float]:
        nu = analysis.fit_power_law(np.log(t), d).params["alpha"]
        alpha = analysis.fit_power_law(t, d).params["alpha"]
        return nu, alpha

    mean_curve = per_walker.mean(axis=0)
    estimate = fits(mean_curve)
    samples = np.array([fits(d) for d in curves])
    result = {}
    for i, name in enumerate(("nu", "alpha")):
        low, high = np.percentile(samples[:, i], [2.5, 97.5])
        result[name] = {
            "estimate": estimate[i],
            "bootstrap_std": float(np.std(samples[:, i])),
            "ci95": [float(low), float(high)],
        }
    result["r_squared_log_log_log"] = analysis.fit_power_law(np.log(t), mean_curve).r_squared
    result["fit_range"] = [float(t[0]), float(t[-1])]
    result["fit_points"] = int(t.size)
    return result


# ---------------------------------------------------------------------------------------
# Main.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--walkers", type=int, default=400, help="walkers per potential type")
    parser.add_argument("--steps", type=int, default=2**20, help="Metropolis steps per walker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.5, help="Metropolis T")
    parser.add_argument(
        "--hurst",
        type=str,
        default="0.5,0.75,0.9,1.0",
        help="comma-separated Hurst exponents H = gamma of the fBm potentials",
    )
    parser.add_argument("--lattice", type=int, default=2**15, help="lattice sites per potential")
    parser.add_argument(
        "--fit-decades", type=float, default=3.0, help="fit over the last this many decades of t"
    )
    parser.add_argument("--samples", type=int, default=120, help="log-spaced sample times")
    parser.add_argument("--bootstrap", type=int, default=300, help="bootstrap resamples")
    parser.add_argument("--quick", action="store_true", help="small smoke run (under a minute)")
    parser.add_argument("--out", type=str, default=str(RESULTS_DIR), help="output directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.walkers, args.steps, args.lattice, args.bootstrap = 100, 2**15, 2**13, 100
        args.fit_decades = 2.0
    hursts = [float(h) for h in args.hurst.split(",") if h.strip()]
    if not hursts or any(not 0.0 < h <= 1.0 for h in hursts):
        parser.error(f"--hurst={args.hurst!r}: give values in (0, 1], e.g. 0.5,0.75,0.95")
    args.hursts = hursts
    for name in ("walkers", "steps", "samples", "bootstrap"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} must be positive")
    if args.steps < 100:
        parser.error(f"--steps={args.steps} is too short to span decades; use at least 100")
    if not args.temperature > 0:
        parser.error(f"--temperature={args.temperature} must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.time()
    key = jax.random.key(args.seed)
    rng = np.random.default_rng(args.seed)
    sample_times = np.unique(np.geomspace(1, args.steps, args.samples).round().astype(np.int64))
    t_min = args.steps / 10.0**args.fit_decades

    cases = [("free", None)] + [(f"H={h:g}", h) for h in args.hursts]
    rows = []
    curves = {}
    for index, (name, hurst) in enumerate(cases):
        case_started = time.time()
        case_key = jax.random.fold_in(key, index)
        potentials, measured_h = None, (None, None)
        if hurst is not None:
            # A pure tilt needs no lattice: sample a short path only to read off its slope.
            length = 1024 if hurst == 1.0 else args.lattice
            potentials = jnp.concatenate(
                [
                    fbm_potentials(jax.random.fold_in(case_key, chunk), count, length, hurst)
                    for chunk, count in enumerate(_chunks(args.walkers, 64))
                ]
            )
            # Increments are stationary, so a window of 200 paths suffices for the check.
            measured_h = structure_function_exponent(
                np.asarray(potentials[:200, :4096]), 256, rng, args.bootstrap
            )
            if hurst == 1.0:
                potentials = potentials[:, 1] - potentials[:, 0]
            else:
                # Walls at both ends; walkers start in the middle and must never reach them.
                potentials = potentials.at[:, 0].set(jnp.inf).at[:, -1].set(jnp.inf)
        displacements, max_excursion = simulate(
            potentials, args.walkers, sample_times, args.temperature, case_key, name
        )
        if (
            potentials is not None
            and potentials.ndim == 2
            and max_excursion >= args.lattice // 2 - 1
        ):
            raise SystemExit(
                f"{name}: a walker reached the lattice edge (excursion {max_excursion}); "
                f"rerun with a larger --lattice (now {args.lattice})."
            )
        fits = bootstrap_fits(sample_times, displacements, t_min, rng, args.bootstrap)
        curves[name] = displacements.mean(axis=0)
        linearized = {}
        if hurst is not None and hurst < 1.0:
            # d ~ (log(t / t0))^(1/H) makes d^H = a + b log t a straight line with
            # t0 = exp(-a / b); t0 > 1 is what pushes the log-log slope above 1/H.
            keep = sample_times >= t_min
            line = analysis.fit_log(sample_times[keep], curves[name][keep] ** hurst)
            linearized = {
                "linear_in_log_t_r_squared": line.r_squared,
                "log_t0": -line.params["a"] / line.params["b"],
            }
        rows.append(
            {
                "case": name,
                "hurst": hurst,
                "predicted_nu": None if hurst is None else 1.0 / hurst,
                "measured_hurst": measured_h[0],
                "measured_hurst_std": measured_h[1],
                "max_excursion": max_excursion,
                "final_distance": float(curves[name][-1]),
                "final_distance_stderr": float(
                    displacements[:, -1].std() / math.sqrt(args.walkers)
                ),
                **linearized,
                "seconds": time.time() - case_started,
                **fits,
            }
        )
        tqdm.write(_row_line(rows[-1]))

    record = {
        "command": provenance.module_command("experiments.paper.random_walk", argv),
        "walkers": args.walkers,
        "steps": args.steps,
        "temperature": args.temperature,
        "lattice": args.lattice,
        "seed": args.seed,
        "bootstrap": args.bootstrap,
        "fit_range": [float(t_min), float(args.steps)],
        "fit_decades": args.fit_decades,
        "wall_seconds": time.time() - started,
        "hardware": _hardware(),
        "provenance": provenance.provenance(),
        "rows": rows,
        "sample_times": sample_times.tolist(),
        "mean_distance": {name: curve.tolist() for name, curve in curves.items()},
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "random_walk_quick" if args.quick else "random_walk")
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write(_markdown(record))
    _plot(record, stem + ".png")
    print(_markdown(record))
    print(f"wrote {stem}.{{json,md,png}}")


def _chunks(total: int, size: int) -> list[int]:
    return [min(size, total - start) for start in range(0, total, size)]


def _row_line(row: dict) -> str:
    return (
        f"{row['case']:>7}: nu={row['nu']['estimate']:.3f}±{row['nu']['bootstrap_std']:.3f} "
        f"alpha={row['alpha']['estimate']:.3f} d(T)={row['final_distance']:.1f} "
        f"max|x|={row['max_excursion']} ({row['seconds']:.0f} s)"
    )


def _hardware() -> str:
    device = jax.devices()[0]
    return (
        f"{platform.machine()} {device.platform} ({device.device_kind}), {os.cpu_count()} CPUs; "
        f"python {platform.python_version()}, jax {jax.__version__}, numpy {np.__version__}"
    )


def _markdown(record: dict) -> str:
    low, high = record["fit_range"]
    header = [
        *("potential", "gamma = H (measured)", "predicted nu = 1/gamma"),
        *("fitted nu: d ~ (log t)^nu", "alpha: d ~ t^alpha"),
        *("d^gamma = a + b log t: R^2, log t0", "d at t_max", "max excursion"),
    ]
    rows = []
    for row in record["rows"]:
        if row["hurst"] is None:
            gamma, predicted = "free diffusion", "none (alpha = 1/2)"
        elif row["hurst"] == 1.0:
            gamma, predicted = "1 exactly: random tilt", "none (ballistic, alpha = 1)"
        else:
            gamma = (
                f"{row['hurst']:g} ({row['measured_hurst']:.3f} ± {row['measured_hurst_std']:.3f})"
            )
            predicted = f"{row['predicted_nu']:.3g}"
        linear = "-"
        if "log_t0" in row:
            linear = f"{row['linear_in_log_t_r_squared']:.4f}, {row['log_t0']:.2f}"
        rows.append(
            [
                row["case"],
                gamma,
                predicted,
                f"{row['nu']['estimate']:.3f} ± {row['nu']['bootstrap_std']:.3f}",
                f"{row['alpha']['estimate']:.3f} ± {row['alpha']['bootstrap_std']:.3f}",
                linear,
                f"{row['final_distance']:.1f}",
                row["max_excursion"],
            ]
        )
    lines = [tables.markdown_table(header, rows)]
    free = next((row for row in record["rows"] if row["hurst"] is None), None)
    lines += [
        "",
        f"Fitting range t in [{low:.4g}, {high:.4g}] (the last {record['fit_decades']:g} "
        "decades of the run); ± is the "
        f"bootstrap standard deviation over {record['walkers']} walkers (one potential "
        f"each, {record['bootstrap']} resamples). {record['walkers']} walkers x "
        f"{record['steps']} Metropolis steps at T = {record['temperature']:g}, lattice "
        f"{record['lattice']} sites, seed {record['seed']}; wall time "
        f"{record['wall_seconds']:.0f} s on {record['hardware']}.",
        f"Command: `{record['command']}`",
        "",
    ]
    if free is not None:
        # A free +-1 walk has E|x_t| -> sqrt(2 t / pi): a check of the simulator itself.
        expected = math.sqrt(2 * record["steps"] / math.pi)
        lines.insert(
            -2,
            f"Free-diffusion check: d(t_max) = {free['final_distance']:.1f} ± "
            f"{free['final_distance_stderr']:.1f}, closed form "
            f"sqrt(2 t_max / pi) = {expected:.1f}.",
        )
    return "\n".join(lines)


def _plot(record: dict, path: str) -> None:
    times = np.asarray(record["sample_times"], dtype=np.float64)
    low, _ = record["fit_range"]
    late = times >= low
    fig, (ax_log, ax_loglog, ax_linear) = plt.subplots(1, 3, figsize=(17, 4.8))
    for row in record["rows"]:
        d = np.asarray(record["mean_distance"][row["case"]])
        hurst = row["hurst"]
        if hurst is None:
            label = "free diffusion"
        elif hurst == 1.0:
            label = f"H = 1 (random tilt): alpha = {row['alpha']['estimate']:.2f}"
        else:
            label = f"H = {hurst:g}: nu = {row['nu']['estimate']:.2f} (1/H = {1 / hurst:.2f})"
        (line,) = ax_log.loglog(times, d, label=label)
        color = line.get_color()
        early = ~late & (times > 1)
        ax_loglog.loglog(np.log(times[late]), d[late], "o", ms=3, color=color)
        ax_loglog.loglog(np.log(times[early]), d[early], "-", lw=1, color=color, alpha=0.5)
        fit = analysis.fit_power_law(np.log(times[late]), d[late])
        ax_loglog.loglog(np.log(times[late]), fit.predict(np.log(times[late])), "k--", lw=0.8)
        if hurst is not None and hurst < 1.0:
            # The law d ~ (log t)^(1/H) says d^H is a straight line in log t.
            scaled = d**hurst / d[-1] ** hurst
            ax_linear.plot(np.log(times), scaled, color=color, label=f"H = {hurst:g}")
    ax_log.axvline(low, color="gray", ls=":", lw=1)
    ax_log.set(
        xlabel="t (Metropolis steps)", ylabel="mean |x_t - x_0|", title="distance against time"
    )
    ax_log.legend(fontsize=8)
    ax_loglog.set(
        xlabel="log t",
        ylabel="mean |x_t - x_0|",
        title="against log t, log-log axes: slope = nu (dots: fit range)",
    )
    ax_linear.axvline(math.log(low), color="gray", ls=":", lw=1)
    ax_linear.set(
        xlabel="log t",
        ylabel="d^H / d(t_max)^H",
        title="d^gamma against log t: the law predicts straight lines",
    )
    ax_linear.legend(fontsize=8)
    fig.suptitle(
        f"Random walk on fBm potentials, T = {record['temperature']:g}, {record['walkers']} walkers"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
