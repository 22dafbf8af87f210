import pytest

from hsic_ray.config import build_config
from hsic_ray.data import ImageData, load_dataset


@pytest.fixture(scope="session")
def digits():
    """A quarter of the bundled real digits (the package's own split): quick enough for many small runs."""
    full = load_dataset(build_config().data)
    return ImageData(
        "mnist-sample", full.x_train[:2000], full.y_train[:2000], full.x_test[:1000], full.y_test[:1000], 10
    )


@pytest.fixture(scope="session")
def all_digits():
    return load_dataset(build_config().data)
