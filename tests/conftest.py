"""Test-session hygiene.

Each test module compiles its own programs; they are dropped when the module ends
(``jax.clear_caches``), so the compiled executables of ~25 modules do not pile up in one
process. A full local run aborted inside XLA compilation late in the suite without it
(see the README's test notes).
"""

import gc

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    yield
    jax.clear_caches()
    gc.collect()
