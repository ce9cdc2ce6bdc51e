"""Helpers the tests share (``from helpers.sampling import ...``): tests/ is on the path through
its conftest.py."""
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ROOT = Path(__file__).resolve().parents[2]  # the repository
