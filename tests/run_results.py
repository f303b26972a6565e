"""Run results in the form experiments.paper reads them, for the tests of its tables."""


def run_result(
    group: str, column: str, seed: int, val: float, test: float, cpu: str = "CPU model A"
) -> dict:
    """One run's result record: its final validation and test accuracy (in %) and the
    CPU model it ran on."""
    return {
        "group": group,
        "column": column,
        "seed": seed,
        "summary": {"final_val_accuracy": val / 100, "final_eval_accuracy": test / 100},
        "hardware": {"cpu": cpu},
    }
