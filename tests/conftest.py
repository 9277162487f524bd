import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_MTD = ROOT.parent / "shared" / "data" / "mtd"


@pytest.fixture(scope="session")
def mtd_root():
    """../shared/data/mtd (real magnetic-tile data), or a skip with the reason."""
    if not (SHARED_MTD / "magnetic_tile" / "train" / "good").is_dir():
        pytest.skip(f"real data folder {SHARED_MTD} is absent (it sits beside the repository only on the "
                    f"developers' and CI machines)")
    return SHARED_MTD


def torch_or_skip():
    torch = pytest.importorskip("torch", reason="parity tests need torch==2.13.0 (pip install -e .[test])")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    return torch
