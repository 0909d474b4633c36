"""Benchmarks printing ratios against reference implementations (see the README)."""

from __future__ import annotations

