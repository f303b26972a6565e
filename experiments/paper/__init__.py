"""The paper's tables and figures: the F1 table, its ablation, the claims and their
verdicts, and the measurements that explain the gaps (diffusion, random walk, sharpness)."""
