"""Chapter 04's exercise references (course_lib.references.ch04), on small planted inputs."""
from types import SimpleNamespace

import pytest
import torch

from course_lib.references import ch04


def test_fisher_eigenvalue_ratio_is_per_layer_mean_over_mean():
    empirical = SimpleNamespace(layers=["a", "b"], lam={"a": torch.tensor([[1.0, 3.0]]), "b": torch.full((2, 2), 4.0)})
    sampled = SimpleNamespace(layers=["a", "b"], lam={"a": torch.tensor([[4.0, 4.0]]), "b": torch.full((2, 2), 2.0)})
    assert ch04.fisher_eigenvalue_ratio(empirical, sampled) == pytest.approx({"a": 0.5, "b": 2.0})
    with pytest.raises(ValueError, match="different layers"):
        ch04.fisher_eigenvalue_ratio(SimpleNamespace(layers=["a"], lam=empirical.lam), sampled)


def _blocks():
    """Planted: layer "a" holds parameters 0-1 (block I), layer "b" parameters 2-4 (block I); the approximation is
    1.1 I on "a" (error 0.1) and 2 I on "b" (error 1), with large entries between the layers that must be ignored."""
    block = torch.eye(5, dtype=torch.float64)
    approx = torch.diag(torch.tensor([1.1, 1.1, 2.0, 2.0, 2.0], dtype=torch.float64))
    approx[0, 4] = approx[4, 0] = 100.0
    return approx, block, ["a", "b"], [0, 2, 5]


def test_kfac_error_by_layer_compares_the_diagonal_blocks_only():
    approx, block, layers, edges = _blocks()
    assert ch04.kfac_error_by_layer(approx, block, layers, edges) == pytest.approx({"a": 0.1, "b": 1.0})
    assert ch04.worst_kfac_layer(approx, block, layers, edges) == "b"
    # the other way round: "a" is the worse block
    approx[:2, :2] *= 10
    assert ch04.worst_kfac_layer(approx, block, layers, edges) == "a"
    with pytest.raises(ValueError, match="edges"):
        ch04.kfac_error_by_layer(approx, block, layers, [0, 2, 4])


def test_best_of_other_rule_takes_the_chosen_labels_and_the_other_rule():
    pd = pytest.importorskip("pandas")
    rows = [("ekfac", "sampled", "absolute", 1e-5, 0.30), ("ekfac", "sampled", "absolute", 1e-4, 0.32),
            ("ekfac", "sampled", "relative", 0.1, 0.35), ("ekfac", "sampled", "relative", 1.0, 0.20),
            ("ekfac", "empirical", "absolute", 1e-6, 0.99),  # other labels: never the answer
            ("kfac", "sampled", "absolute", 1e-3, 0.99)]  # other curvature: never the answer
    table = pd.DataFrame(rows, columns=["curvature", "labels", "damping rule", "damping", "LDS tune"])
    got = ch04.best_of_other_rule(table, "ekfac", {"labels": "sampled", "relative": True, "damping": 0.1})
    assert got == {"rule": "absolute", "damping": 1e-4, "LDS tune": 0.32, "chosen LDS tune": 0.35}
    got = ch04.best_of_other_rule(table, "ekfac", {"labels": "sampled", "relative": False, "damping": 1e-4})
    assert (got["rule"], got["damping"]) == ("relative", 0.1)
    with pytest.raises(ValueError, match="no relative damping"):
        ch04.best_of_other_rule(table, "ekfac", {"labels": "empirical", "relative": False})
