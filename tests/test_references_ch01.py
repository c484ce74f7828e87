"""Chapter 01's exercise references (course_lib.references.ch01) on small planted inputs."""
import pytest
import torch

from course_lib import models
from course_lib.references import ch01


def test_lissa_depth_solves_scale_over_depth_equals_damping():
    assert ch01.lissa_depth(3.0, 0.01) == pytest.approx(300.0)
    assert ch01.lissa_depth(3.0, 0.01) * 0.01 / 300.0 == pytest.approx(0.01)  # s / D at that depth is the damping
    assert ch01.lissa_depth(3.0, 0.1) == pytest.approx(30.0)  # ten times the damping, a tenth of the depth
    with pytest.raises(ValueError, match="positive"):
        ch01.lissa_depth(3.0, 0.0)


def _tiny(net, seed=0):
    torch.manual_seed(seed)
    net = net.double().eval()
    x = torch.randn(12, 1, 2, 2, dtype=torch.float64)
    y = torch.arange(12) % 3
    return net, {k: v.detach() for k, v in net.state_dict().items()}, x, y


def test_hessian_spectrum_is_the_sorted_spectrum_of_the_mean_loss_hessian():
    net, state, x, y = _tiny(models.MLP((1, 2, 2), 3, width=3, depth=1))
    names = list(state)

    def mean_loss(*flat):
        out = torch.func.functional_call(net, dict(zip(names, flat)), (x,))
        return torch.nn.functional.cross_entropy(out, y)

    blocks = torch.autograd.functional.hessian(mean_loss, tuple(state.values()))
    sizes = [v.numel() for v in state.values()]
    explicit = torch.cat([torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(sizes))], 1)
                          for i in range(len(sizes))], 0)
    got = ch01.hessian_spectrum(net, state, x, y)
    assert torch.allclose(got, torch.linalg.eigvalsh(explicit), atol=1e-10)
    assert bool((got[1:] >= got[:-1]).all())  # ascending: the answer is the first
    # a ReLU network at random weights: indefinite (the exercise's point); a convex model: no negative eigenvalue
    assert got[0] < -1e-8 < 1e-8 < got[-1]
    lr_net, lr_state, x2, y2 = _tiny(models.LogisticRegression((1, 2, 2), 3))
    assert ch01.hessian_spectrum(lr_net, lr_state, x2, y2)[0] > -1e-10


def test_look_alike_sign_takes_the_nearest_image_of_the_targets_label():
    basis = torch.eye(4).reshape(4, 1, 2, 2)  # four orthogonal images
    x_targets = basis[[0, 1]] + 0.1 * basis[[2, 3]]  # target 0 looks like image 0, target 1 like image 1
    y_targets = torch.tensor([0, 1])
    # image 4 is an exact copy of target 0 with the other label: the nearest picture, but not of the target's label
    x_train = torch.cat([basis, x_targets[:1]])
    y_train = torch.tensor([0, 1, 0, 1, 1])
    scores = torch.tensor([[1.0, -5.0], [-5.0, 2.0], [-1.0, -1.0], [-1.0, -1.0], [-9.0, -9.0]])  # look-alikes > 0
    assert ch01.look_alike_sign(scores, x_train, y_train, x_targets, y_targets) == ("positive", 1.0)
    assert ch01.look_alike_sign(-scores, x_train, y_train, x_targets, y_targets) == ("negative", 0.0)
    # relabelled 1, target 0's look-alike is image 4 (score -9): one target of two positive is not a majority
    assert ch01.look_alike_sign(scores, x_train, y_train, x_targets, torch.tensor([1, 1])) == ("negative", 0.5)
    with pytest.raises(ValueError, match="label"):
        ch01.look_alike_sign(scores, x_train, y_train, x_targets, torch.tensor([0, 2]))
