"""grads: the contracts of the helpers that the chapter-level tests do not reach (gaps found by mutation testing,
see README "Testing"): 3-channel inputs, the default measurement, restricting to some parameters, the default
weight decay of the Hessian products, and the error messages."""
import pytest
import torch
from torch.func import functional_call

from course_lib import grads, measure, models


def _cnn(in_shape=(3, 8, 8), classes=4, n=6, seed=0):
    torch.manual_seed(seed)
    net = models.SmallCNN(in_shape, classes, width=2, hidden=8).double()
    state = {k: v.detach() for k, v in net.named_parameters()}
    g = torch.Generator().manual_seed(seed)
    return net, state, torch.randn(n, *in_shape, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,),
                                                                                                   generator=g)


def _logreg(n=6, seed=0):
    torch.manual_seed(seed)
    net = models.LogisticRegression((1, 4, 4), 3).double()  # p = 16 * 3 + 3 = 51
    state = {k: v.detach() for k, v in net.named_parameters()}
    g = torch.Generator().manual_seed(seed)
    return net, state, torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,),
                                                                                                 generator=g)


def _loop_of_backward_calls(net, state, x, y, fn):
    rows = []
    for i in range(len(y)):
        live = {k: v.clone().requires_grad_() for k, v in state.items()}
        out = measure.get(fn)(functional_call(net, live, (x[i:i + 1],)), y[i:i + 1]).sum()
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(out, list(live.values()))]))
    return torch.stack(rows)


def test_per_example_grads_of_colour_images_default_to_the_loss():
    """3-channel images (CIFAR's shape; MNIST's single channel hides a wrong unsqueeze), in batches of 4 that do
    not divide the 6 examples, with the default measurement (the loss): equal to a loop of backward calls.
    Measured: 2.8e-17 apart in float64."""
    net, state, x, y = _cnn()
    got = grads.per_example_grads(net, state, x, y, batch_size=4)
    assert torch.allclose(got, _loop_of_backward_calls(net, state, x, y, "loss"), rtol=0, atol=3e-16)


def test_per_example_grads_restricted_to_some_parameters():
    """names= keeps only those parameters' columns (the others held fixed), in the module's order (measured:
    identical)."""
    net, state, x, y = _cnn()
    full = grads.per_example_grads(net, state, x, y, fn="margin")
    sizes = {k: v.numel() for k, v in state.items()}
    start = list(state).index("head.weight")
    lo = sum(list(sizes.values())[:start])
    sub = grads.per_example_grads(net, state, x, y, fn="margin", names=["head.weight", "head.bias"])
    assert sub.shape == (6, sizes["head.weight"] + sizes["head.bias"])
    assert torch.allclose(sub, full[:, lo:lo + sub.shape[1]], rtol=0, atol=1e-15)


def test_hessian_products_default_to_no_weight_decay():
    """hvp / hvps without a weight_decay argument multiply by the Hessian of the plain mean loss, the one
    ``hessian`` (reverse-over-reverse) computes by default; with weight_decay they add wd * v.
    Measured: 1.1e-15 apart (entries up to 2) in float64; a default weight decay of 1 would add v (up to 3.7)."""
    net, state, x, y = _logreg()
    H = grads.hessian(net, state, x, y)
    g = torch.Generator().manual_seed(1)
    V = torch.randn(51, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(grads.hvp(net, state, x, y, V[:, 0]), H @ V[:, 0], rtol=0, atol=1e-14)
    assert torch.allclose(grads.hvps(net, state, x, y, V), H @ V, rtol=0, atol=1e-14)
    assert torch.allclose(grads.hvps(net, state, x, y, V, weight_decay=0.1), H @ V + 0.1 * V, rtol=0, atol=1e-14)


def test_helpers_fail_with_messages_that_say_what_is_wrong():
    net, state, x, y = _logreg()
    with pytest.raises(ValueError, match=r"^vector has 52 entries, parameters have 51$"):
        grads.unflatten(torch.zeros(52, dtype=torch.float64), state)  # (a short one fails earlier, in view_as)
    with pytest.raises(ValueError, match=r"none of the module's parameters \(got keys \['a', 'b', 'c', 'd', 'e'\]\.\.\.\)"):
        grads.split_state(net, {k: torch.zeros(1) for k in "abcdefg"})
    with pytest.raises(ValueError, match=r"V must have shape \(p, T\), got \(51,\)"):
        grads.hvps(net, state, x, y, torch.zeros(51, dtype=torch.float64))
    bad = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
    # d margin / d logit_y = 1 whatever the other logits are: the correct class's 17 of 51 columns stay finite
    with pytest.raises(FloatingPointError, match=r"^per-example gradients of the margin: 204 of 306 entries are NaN"):
        grads.per_example_grads(net, bad, x, y, fn="margin")
