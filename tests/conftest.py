import os

import pytest
import torch

from course_lib import data as D, settings

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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
