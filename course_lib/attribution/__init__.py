"""Attribution methods, one module per family. Every method returns scores of shape (n_train, n_targets) where
tau[i, t] estimates the effect of INCLUDING training example i on target t's margin (positive raises it)."""
