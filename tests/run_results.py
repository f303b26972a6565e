"""Run results in the form experiments.paper reads them, for the tests of its tables."""


def run_result(group: str, column: str, seed: int, val: float, test: float) -> dict:
    """One run's result record with its final validation and test accuracy (in %)."""
    return {
        "group": group,
        "column": column,
        "seed": seed,
        "summary": {"final_val_accuracy": val / 100, "final_eval_accuracy": test / 100},
    }
