"""Error kinds are types: the kind, a row's status and a rerun's retry follow the type, not the wording."""

from __future__ import annotations

import pytest
import torch

from pipeline import errors
from pipeline.manifest import RETRIED_KINDS


def test_every_kind_is_distinct_and_only_non_images_pair_halves_and_vanished_inputs_are_left_alone():
    kinds = [cls.kind for cls in errors.KINDS]
    assert len(kinds) == len(set(kinds))
    left_alone = [cls.kind for cls in errors.KINDS if cls.leaves_alone]
    assert left_alone == ["not-an-image", "raw-jpeg-pair", "deleted-while-read"]
    assert RETRIED_KINDS == {"write-error", "out-of-memory", "read-error", "changed-while-read"}
    assert errors.LISTING_KINDS == {"raw-jpeg-pair"}


def test_a_message_can_say_anything():
    exc = errors.CorruptImageError("a.jpg: cannot write, not an image, out of memory")
    assert errors.error_kind(exc) == "corrupt-image" and errors.classify(exc) is errors.CorruptImageError


@pytest.mark.parametrize(
    "exc",
    [
        MemoryError(),
        torch.OutOfMemoryError("CUDA out of memory"),
        RuntimeError("Failed to allocate memory: out of memory"),
    ],
)
def test_foreign_out_of_memory_is_its_kind(exc):
    assert errors.error_kind(exc) == "out-of-memory" and errors.classify(exc).retried_by_rerun


def test_other_foreign_errors_are_named_by_their_type():
    assert errors.classify(ValueError("x")) is None and errors.error_kind(ValueError("x")) == "ValueError"
