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


def _tiny_mlp(seed=0):
    """A small float64 MLP (two Linear layers) with random weights, and random inputs and labels."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double().eval()
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    x = torch.randn(60, 5, dtype=torch.float64)
    return net, state, x, torch.randint(0, 3, (60,))


def test_sampled_labels_are_seeded_draws_from_the_model():
    net, state, x, _ = _tiny_mlp()
    a, b = ch04.sampled_labels(net, state, x, 0), ch04.sampled_labels(net, state, x, 0)
    assert torch.equal(a, b) and a.shape == (60,) and int(a.max()) < 3
    assert not torch.equal(a, ch04.sampled_labels(net, state, x, 1))


def test_mixed_eigenvalue_errors_keep_ekfacs_guarantee_and_mix_two_matrices(monkeypatch):
    from course_lib.attribution import ekfac

    net, state, x, y = _tiny_mlp()
    fac = ekfac.fit_factors(net, state, x, y, labels="empirical")
    target = ch04.empirical_fisher_blocks(fac, net, state, x, y)
    # the block-diagonal empirical Fisher from autograd, one example at a time, in the layer order
    order = ekfac.layer_order(state, ekfac.layers_of(net))
    rows = []
    for xi, yi in zip(x, y):
        net.zero_grad()
        torch.nn.functional.cross_entropy(net(xi[None]), yi[None]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
    g = torch.stack(rows)[:, order]
    assert torch.allclose(target, fac.block_diagonal(g.T @ g / len(x)), atol=1e-12)
    err = ch04.mixed_eigenvalue_errors(net, state, x, y, seed=0)
    assert set(err) == {"K-FAC", "EK-FAC", "mixed"}
    assert err["EK-FAC"] <= err["K-FAC"] + 1e-12  # the guarantee of the best diagonal in the basis
    assert err["mixed"] != pytest.approx(err["EK-FAC"])  # other labels: another diagonal
    # with the training labels in both passes the "mixture" is EK-FAC itself
    monkeypatch.setattr(ch04, "sampled_labels", lambda net, state, x, seed=0: y)
    same = ch04.mixed_eigenvalue_errors(net, state, x, y)
    assert same["mixed"] == pytest.approx(err["EK-FAC"], rel=1e-10)
