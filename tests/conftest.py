import pytest
import torch

from course_lib import data as D, settings


@pytest.fixture(scope="session")
def mnist():
    return D.mnist5k()


@pytest.fixture(scope="session")
def smoke():
    return settings.get("smoke", device="cpu")


@pytest.fixture(scope="session")
def smoke_data(smoke):
    return D.mnist5k(n_train=smoke.n_train, n_targets=smoke.n_targets)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
