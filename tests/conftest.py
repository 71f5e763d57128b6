"""Shared fixtures. GPU cases are marked ``cuda`` and skip cleanly without a GPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FASTEM_DATA", REPO.parent / "shared" / "data"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than ~20 s on a 2-core CPU")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"test data not found at {DATA} (set FASTEM_DATA to ../shared/data)")
    return DATA


@pytest.fixture(scope="session")
def val_crop(data_dir: Path) -> torch.Tensor:
    """A 256×256 centre crop of kodak_01, [3, 256, 256] float32 in [0, 1]."""
    from fastem_ext.io import read_image

    image, _ = read_image(data_dir / "natural" / "val" / "kodak_01.png")
    return center_crop(image, 256)


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    top = (image.shape[-2] - size) // 2
    left = (image.shape[-1] - size) // 2
    return image[..., top : top + size, left : left + size].contiguous()
