"""Test helpers shared by several test modules (tests/ is on sys.path: pyproject's pytest
`pythonpath`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

REFERENCE = Path(__file__).resolve().parent / "reference"  # TFF / Keras reference files

WORDS = "the king shall my lord good sir what now thou art love fair night day come go".split()


def make_clients(root: Path, n: int = 8, paragraphs: int = 6, seed: int = 0) -> Path:
    """n client .txt files of seeded pseudo-English paragraphs (~300 chars each)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for c in range(n):
        paras = []
        for _ in range(paragraphs + c % 3):
            words = rng.choice(WORDS, size=rng.integers(40, 70))
            paras.append(" ".join(words).capitalize() + ".")
        (root / f"CLIENT_{c}.txt").write_text("\n\n".join(paras) + "\n")
    return root
