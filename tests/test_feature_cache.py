"""The vision-feature cache: a group seen before skips the vision tower, with the same tokens, and nothing
stale survives a change of weights."""

from __future__ import annotations

import pytest
import torch
from conftest import shape_image


@pytest.fixture
def counted(make_encoder, monkeypatch):
    """An encoder whose vision tower records how many images each call read."""
    encoder = make_encoder()
    images_read = []
    original = encoder.visual.forward

    def forward(pixels, grid_thw, **kwargs):
        images_read.append(len(grid_thw))
        return original(pixels, grid_thw=grid_thw, **kwargs)

    monkeypatch.setattr(encoder.visual, "forward", forward)
    return encoder, images_read


def encode(encoder, groups, prompts):
    with torch.no_grad():
        return encoder(groups, prompts)


def test_a_group_seen_before_skips_the_tower_and_gives_the_same_tokens(counted, make_encoder, groups):
    encoder, images_read = counted
    first = encode(encoder, groups, ["a cat", "a dog"])
    assert sum(images_read) == 4
    images_read.clear()
    again = encode(encoder, groups, ["a house", "a dog"])  # new prompt, same references
    assert images_read == []
    uncached = make_encoder()
    uncached.vision_cache.capacity = 0
    assert torch.equal(again, encode(uncached, groups, ["a house", "a dog"]))
    # the other row's padding differs with the first row's prompt, so equal up to float sums
    torch.testing.assert_close(first[1], again[1], atol=1e-5, rtol=0)


def test_only_the_new_references_of_a_group_run(counted, groups):
    encoder, images_read = counted
    encode(encoder, [groups[0]], ["a"])
    images_read.clear()
    encode(encoder, [groups[0][:2] + [shape_image("green")]], ["a"])
    assert sum(images_read) == 1


def test_an_image_twice_in_one_call_runs_once(counted):
    encoder, images_read = counted
    image = shape_image("green")
    encode(encoder, [[image, image.copy()]], ["a"])
    assert sum(images_read) == 1


def test_changed_weights_drop_every_entry(counted, make_encoder, groups):
    encoder, images_read = counted
    encode(encoder, groups, ["a", "b"])
    with torch.no_grad():  # in place, as an optimizer step or load_state_dict does
        next(encoder.visual.parameters()).add_(0.05)
    images_read.clear()
    changed = encode(encoder, groups, ["a", "b"])
    assert sum(images_read) == 4
    fresh = make_encoder()
    fresh.vision_cache.capacity = 0
    fresh.load_state_dict(encoder.state_dict())
    torch.testing.assert_close(changed, encode(fresh, groups, ["a", "b"]), atol=0, rtol=0)


def test_replaced_weights_drop_every_entry(counted, groups):
    encoder, images_read = counted
    encode(encoder, groups, ["a", "b"])
    encoder.visual.to(torch.float64).to(torch.float32)  # new storage, same values
    images_read.clear()
    encode(encoder, groups, ["a", "b"])
    assert sum(images_read) == 4


def test_with_gradients_the_tower_always_runs_and_gradients_reach_it(counted, groups):
    encoder, images_read = counted
    encode(encoder, groups, ["a", "b"])  # fills the cache
    images_read.clear()
    encoder(groups, ["a", "b"]).sum().backward()
    assert sum(images_read) == 4
    assert all(p.grad is not None for p in encoder.visual.parameters() if p.requires_grad)


def test_capacity_bounds_the_entries_least_recently_used_first(counted, groups):
    encoder, images_read = counted
    encoder.vision_cache.capacity = 2
    encode(encoder, [groups[0]], ["a"])  # three images
    assert len(encoder.vision_cache) == 2
    images_read.clear()
    encode(encoder, [groups[0][1:]], ["a"])  # the two most recent ones
    assert images_read == []
    encoder.vision_cache.capacity = 0
    encoder.vision_cache.clear()
    encode(encoder, [groups[0]], ["a"])
    assert len(encoder.vision_cache) == 0
