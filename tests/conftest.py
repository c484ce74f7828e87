import os
import pickle

import numpy as np
import pytest
import torch

from course_lib import data as D, measure, settings

# In test runs a set but wrong exercise answer raises (course_lib.exercises.check), so that an instructor solution
# that no longer matches its check fails the smoke run of its chapter; nbval's kernels inherit this environment.
# Unset answers (the student copies) never raise.
os.environ.setdefault("COURSE_EXERCISES_STRICT", "1")


@pytest.fixture(scope="session")
def mnist():
    return D.mnist5k()


@pytest.fixture(scope="session")
def smoke():
    return settings.get("smoke", device="cpu")


@pytest.fixture(scope="session")
def smoke_data(smoke):
    return D.mnist5k(n_train=smoke.n_train, n_targets=smoke.n_targets)


@pytest.fixture(scope="module")
def toy():
    """24 random 8x8 'images' in 3 classes, 8 test images of which the first 4 are the targets."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (32,), generator=g)
    return D.Data("toy", x[:24], y[:24], x[24:], y[24:], torch.arange(4), ("a", "b", "c"))


def autograd_grads(module, x, y, fn):
    """Reference per-example gradients (n, p): one autograd call per example on an ordinary module."""
    rows = []
    for i in range(len(y)):
        out = measure.get(fn)(module(x[i:i + 1]), y[i:i + 1]).sum()
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(out, list(module.parameters()))]))
    return torch.stack(rows)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------ a fake CIFAR-10 (tests of the cifar and gpu paths)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_fake_cifar(root, n_per_batch: int = 20):
    """A tiny CIFAR-10 in torchvision's on-disk format (cifar-10-batches-py with pickled batches) under ``root``:
    five training batches and a test batch of ``n_per_batch`` random images each, labels ``i % 10`` (so CIFAR-2, cats
    and dogs, keeps a fifth of them: n_per_batch training and n_per_batch / 5 test images, half of each class)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 "labels": [i % 10 for i in range(n_per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10_CLASSES}, f)
    return root


def offline_cifar(mp: pytest.MonkeyPatch):
    """Let torchvision's CIFAR10 read the fake files, and make any download attempt fail loudly. The fake files
    cannot match torchvision's MD5 checksums of the real archive; everything else is torchvision's real code."""
    import torchvision.datasets.cifar as tv_cifar

    def no_download(*args, **kwargs):
        raise AssertionError("a test tried to download CIFAR-10")

    mp.setattr(tv_cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    mp.setattr(tv_cifar, "download_and_extract_archive", no_download)


@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    """A folder holding a fake CIFAR-10 of 20 images per batch (100 training, 20 test), readable offline."""
    write_fake_cifar(tmp_path)
    offline_cifar(monkeypatch)
    return tmp_path


@pytest.fixture(scope="module")
def fake_cifar_env(tmp_path_factory):
    """For a whole test module: a fake CIFAR-10 of 40 images per batch (CIFAR-2: 40 training and 8 test images,
    half cats, half dogs), $COURSE_DATA pointing at it (so ``data.for_setting`` finds it with its defaults, download
    included, which must then find the files present) and $COURSE_CACHE at an empty folder. Yields
    {"data": folder, "cache": folder}."""
    with pytest.MonkeyPatch.context() as mp:
        root = write_fake_cifar(tmp_path_factory.mktemp("cifar"), n_per_batch=40)
        cache = tmp_path_factory.mktemp("cache")
        offline_cifar(mp)
        mp.setenv("COURSE_DATA", str(root))
        mp.setenv("COURSE_CACHE", str(cache))
        yield {"data": root, "cache": cache}
