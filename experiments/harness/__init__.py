"""What the experiments share: provenance of every record, launching and resuming trainer
runs, markdown tables and the timing loop."""
