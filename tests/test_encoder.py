"""ReferenceEncoder: shapes, sensitivity, batching, the release's 'official' semantics, memory."""

from __future__ import annotations

import pytest
import torch
from conftest import shape_image
from transformers import Qwen2VLForConditionalGeneration

ATOL = 1e-5


def encode(encoder, groups, prompts):
    with torch.no_grad():
        return encoder(groups, prompts)


def test_output_shape_and_sensitivity(make_encoder, groups):
    encoder = make_encoder()
    out = encode(encoder, groups, ["a cat", "a dog"])
    assert out.shape == (2, 64, 64)
    other_refs = encode(encoder, [[shape_image("green")], groups[1]], ["a cat", "a dog"])
    other_prompt = encode(encoder, groups, ["a house", "a dog"])
    assert not torch.allclose(out[0], other_refs[0], atol=1e-3), "output must depend on the references"
    assert not torch.allclose(out[0], other_prompt[0], atol=1e-3), "output must depend on the prompt"
    torch.testing.assert_close(out[1], other_refs[1], atol=ATOL, rtol=0)  # other rows untouched


def test_batch_of_groups_equals_each_group_alone(make_encoder, groups):
    encoder = make_encoder()
    prompts = ["a cat in a hat", "dog"]
    together = encode(encoder, groups, prompts)
    for i, (group, prompt) in enumerate(zip(groups, prompts)):
        torch.testing.assert_close(together[i : i + 1], encode(encoder, [group], [prompt]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("batch, calls", [(None, 1), (1, 4), (3, 2), ("auto", 4)])
def test_vision_batch_size_bounds_the_images_per_call_and_changes_no_token(
    make_encoder, groups, monkeypatch, batch, calls
):
    """4 images in all: `vision_batch_size` images per vision call, and the same tokens whatever it is."""
    encoder = make_encoder()
    expected = encode(encoder, groups, ["a", "b"])
    seen = []
    original = encoder.visual.forward
    monkeypatch.setattr(encoder.visual, "forward", lambda *a, **k: seen.append(1) or original(*a, **k))
    encoder.vision_batch_size = batch
    encoder.vision_cache.capacity = 0  # every image through the tower again (the cache has its own tests)
    # the same features up to the order of float sums in differently sized matrix products
    torch.testing.assert_close(encode(encoder, groups, ["a", "b"]), expected, atol=1e-4, rtol=0)
    assert len(seen) == calls


# ---------------------------------------------------------------------------- official semantics
def _reference_computation(encoder, qwen_dir, group, prompt, positions="sequential", normed=True):
    """The release's effective computation, rebuilt from transformers' own Qwen2-VL modules."""
    model = Qwen2VLForConditionalGeneration.from_pretrained(qwen_dir, attn_implementation="sdpa").eval()
    inputs = encoder.prepare([group], [prompt])
    language = model.model.language_model
    last = language.layers[-1]
    language.layers = language.layers[:-1]
    with torch.no_grad():
        embeds = language.embed_tokens(inputs.input_ids)
        feats = model.model.visual(inputs.pixel_values, grid_thw=inputs.image_grid_thw).pooler_output
        embeds = embeds.masked_scatter((inputs.input_ids == model.config.image_token_id)[..., None], feats)
        position_ids = None
        if positions == "mrope":
            token_types = (inputs.input_ids == model.config.image_token_id).int()
            position_ids, _ = model.model.get_rope_index(
                inputs.input_ids,
                token_types,
                image_grid_thw=inputs.image_grid_thw,
                attention_mask=inputs.attention_mask,
            )
            assert not torch.equal(position_ids[1], position_ids[2]), "grid positions must differ from 1-D ones"
        if not normed:
            language.norm = torch.nn.Identity()
        trunk = language(inputs_embeds=embeds, position_ids=position_ids).last_hidden_state
        # the aggregation layer as the release ran it: a one-layer text model over [context ; tokens]
        aggregator = Qwen2VLForConditionalGeneration.from_pretrained(qwen_dir, attn_implementation="sdpa")
        agg_model = aggregator.model.language_model.eval()
        agg_model.layers = torch.nn.ModuleList([last])
        agg_model.norm.load_state_dict(encoder.aggregator.norm.state_dict())
        tokens = encoder.aggregator.reference_tokens[None]
        out = agg_model(inputs_embeds=torch.cat([trunk, tokens], dim=1)).last_hidden_state
    return out[:, -tokens.shape[1] :]


def test_official_mode_equals_release_computation(make_encoder, tiny_dirs, groups):
    encoder = make_encoder()
    ours = encode(encoder, groups[:1], ["a cat"])
    reference = _reference_computation(encoder, tiny_dirs["qwen"], groups[0], "a cat")
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)


def test_official_quirk_positions_are_not_mrope(make_encoder, tiny_dirs, groups):
    encoder = make_encoder()
    ours = encode(encoder, groups[:1], ["a cat"])
    mrope = _reference_computation(encoder, tiny_dirs["qwen"], groups[0], "a cat", positions="mrope")
    assert (ours - mrope).abs().max() > 1e-3


def test_official_quirk_trunk_output_is_normed(make_encoder, tiny_dirs, groups):
    encoder = make_encoder()
    ours = encode(encoder, groups[:1], ["a cat"])
    unnormed = _reference_computation(encoder, tiny_dirs["qwen"], groups[0], "a cat", normed=False)
    assert (ours - unnormed).abs().max() > 1e-3


def test_official_quirk_aggregation_is_causal(make_encoder, groups):
    official = make_encoder(seed=0)
    bidirectional = make_encoder(seed=0, attention_mode="bidirectional")
    torch.testing.assert_close(
        official.aggregator.reference_tokens, bidirectional.aggregator.reference_tokens, atol=0, rtol=0
    )
    a = encode(official, groups[:1], ["a cat"])
    b = encode(bidirectional, groups[:1], ["a cat"])
    assert (a - b).abs().max() > 1e-3
    # causal: the first reference token cannot see the later ones; bidirectional: it can
    for encoder, first in ((official, a), (bidirectional, b)):
        with torch.no_grad():
            encoder.aggregator.reference_tokens[1:] += 1.0
        changed = (encode(encoder, groups[:1], ["a cat"])[:, 0] - first[:, 0]).abs().max()
        assert (changed < ATOL) if encoder is official else (changed > 1e-3)


def test_bidirectional_batch_equals_parts(make_encoder, groups):
    encoder = make_encoder(attention_mode="bidirectional")
    together = encode(encoder, groups, ["x", "y"])
    torch.testing.assert_close(together[1:], encode(encoder, groups[1:], ["y"]), atol=ATOL, rtol=0)


def _aggregation_over_whole_sequence(encoder, context, mask, positions):
    """The aggregation layer run over [context ; reference tokens], every row, as the release ran it."""
    from easyref.encoder import _attention_mask

    batch, n = context.shape[0], encoder.config.num_reference_tokens
    tokens = encoder.aggregator.reference_tokens[None].expand(batch, -1, -1)
    full_mask = torch.cat([mask, mask.new_ones(batch, n)], dim=1)
    token_positions = mask.sum(-1, keepdim=True) + torch.arange(n)
    rotary = encoder.rotary_emb(context, torch.cat([positions, token_positions], dim=1))
    causal = encoder.config.attention_mode == "official"
    layer = encoder.aggregator.layers[-1]
    hidden = layer(
        torch.cat([context, tokens], dim=1),
        attention_mask=_attention_mask(full_mask, causal, context.dtype),
        position_embeddings=rotary,
    )
    return encoder.aggregator.norm(hidden[:, -n:])


@pytest.mark.parametrize("attention_mode", ["official", "bidirectional"])
def test_aggregation_computes_only_the_reference_token_rows(make_encoder, groups, attention_mode):
    """The context gives keys and values only: the layer's queries and MLP see n rows per group, and the
    tokens equal the layer run over the whole sequence (a padded batch of two groups)."""
    encoder = make_encoder(attention_mode=attention_mode)
    inputs = encoder.prepare(groups, ["a cat", "a house on a hill"])
    assert not inputs.attention_mask.bool().all(), "the batch must be padded"
    rows = []
    layer = encoder.aggregator.layers[-1]
    handles = [
        module.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1]))
        for module in (layer.self_attn.q_proj, layer.mlp)
    ]
    with torch.no_grad():
        context, positions = encoder.trunk(inputs)
        ours = encoder.aggregate(context, inputs.attention_mask, positions)
        for handle in handles:
            handle.remove()
        whole = _aggregation_over_whole_sequence(encoder, context, inputs.attention_mask, positions)
    n = encoder.config.num_reference_tokens
    assert rows == [torch.Size([2, n])] * 2
    torch.testing.assert_close(ours, whole, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------- memory, dtype, checkpointing
def _unique_numel(module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def test_mllm_weights_held_once(make_encoder, tiny_dirs):
    encoder = make_encoder()
    full = Qwen2VLForConditionalGeneration.from_pretrained(tiny_dirs["qwen"])
    hidden = full.config.text_config.hidden_size
    # trunk + the last layer moved (not copied) into the aggregator + one extra norm + 64 tokens
    assert _unique_numel(encoder) == _unique_numel(full) + hidden + 64 * hidden
    layer_ids = {id(p) for p in encoder.aggregator.layers.parameters()}
    assert not layer_ids & {id(p) for p in encoder.layers.parameters()}


def test_dtype_follows_module(make_encoder, groups):
    encoder = make_encoder().to(torch.bfloat16)
    out = encode(encoder, groups, ["a", "b"])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_gradient_checkpointing_same_gradients(make_encoder, groups):
    grads = []
    for enabled in (False, True):
        encoder = make_encoder(seed=3).train()
        if enabled:
            encoder.gradient_checkpointing_enable()
            assert all(block.gradient_checkpointing for block in encoder.visual.blocks)
        encoder(groups, ["a", "b"]).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in encoder.aggregator.parameters()]))
        assert encoder.layers[0].mlp.down_proj.weight.grad is not None
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_negative_branch_shape(make_encoder):
    encoder = make_encoder()
    with torch.no_grad():
        negative = encoder.encode_negative()
    assert negative.shape == (1, 64, 64)


def test_loaded_dtype_is_the_encoders_dtype(tiny_dirs):
    from conftest import tiny_config

    from easyref import ReferenceEncoder

    encoder = ReferenceEncoder.from_pretrained(tiny_dirs["qwen"], tiny_config(tiny_dirs["qwen"]), dtype=torch.bfloat16)
    assert encoder.dtype == torch.bfloat16
    assert {p.dtype for p in encoder.parameters()} == {torch.bfloat16}


def test_context_is_what_the_prompt_end_sees_and_depends_only_on_what_came_before(make_encoder, groups):
    encoder = make_encoder()
    prompts = ["a cat", "a dog"]
    inputs = encoder.prepare(groups, prompts)
    with torch.no_grad():
        hidden, positions = encoder.trunk(inputs)
        changed, _ = encoder.trunk(encoder.prepare(groups, ["a cat", "a house"]))
    assert hidden.shape[:2] == inputs.attention_mask.shape and positions.shape == inputs.attention_mask.shape
    assert torch.isfinite(hidden).all()
    torch.testing.assert_close(hidden[0], changed[0], atol=ATOL, rtol=0)  # other rows untouched
    last = int(inputs.attention_mask[1].sum()) - 1
    assert not torch.allclose(hidden[1, last], changed[1, last], atol=1e-3)  # the prompt's end reads the prompt


def _maps(encoder, groups, prompts):
    with torch.no_grad():
        return encoder.encode_with_maps(encoder.prepare(groups, prompts))


def test_reference_maps_come_with_the_same_tokens_one_grid_per_reference(make_encoder, groups):
    encoder = make_encoder()
    prompts = ["a cat", "a dog"]
    tokens, maps = _maps(encoder, groups, prompts)
    torch.testing.assert_close(tokens, encode(encoder, groups, prompts), atol=0, rtol=0)  # the maps change nothing
    inputs = encoder.prepare(groups, prompts)
    merge = encoder.mllm_config.vision_config.spatial_merge_size
    grids = [(int(h) // merge, int(w) // merge) for _, h, w in inputs.image_grid_thw.tolist()]
    assert [len(g) for g in maps] == [len(g) for g in groups]
    assert [tuple(m.shape) for g in maps for m in g] == grids
    for group in maps:
        assert all((m >= 0).all() for m in group)
        torch.testing.assert_close(sum(m.sum() for m in group), torch.tensor(1.0), atol=1e-5, rtol=0)
    assert encoder.aggregator.layers[-1].self_attn.config._attn_implementation != "eager"  # restored


def test_reference_maps_of_a_batch_equal_each_group_alone(make_encoder, groups):
    encoder = make_encoder()
    _, together = _maps(encoder, groups, ["a cat", "a dog"])
    for group, prompt, maps in zip(groups, ["a cat", "a dog"], together):
        _, alone = _maps(encoder, [group], [prompt])
        for a, b in zip(maps, alone[0]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_per_reference_modes_weigh_each_reference_equally(make_encoder, groups):
    for mode in ("mean", "concat"):
        encoder = make_encoder(reference_mode=mode)
        tokens, maps = _maps(encoder, groups, ["a cat", "a dog"])
        torch.testing.assert_close(tokens, encode(encoder, groups, ["a cat", "a dog"]), atol=ATOL, rtol=0)
        for group in maps:
            for m in group:
                torch.testing.assert_close(m.sum(), torch.tensor(1 / len(group)), atol=1e-5, rtol=0)


def test_an_unpadded_group_builds_no_dense_mask(make_encoder, groups, monkeypatch):
    """One group (no padding) takes SDPA's causal path: no (B, 1, L, L) mask is built; a batch of groups of
    unequal lengths still is masked (`test_batch_of_groups_equals_each_group_alone` checks they agree)."""
    from easyref import encoder as encoder_module

    built = []
    original = encoder_module._attention_mask
    monkeypatch.setattr(encoder_module, "_attention_mask", lambda *a: built.append(1) or original(*a))
    encoder = make_encoder()
    encode(encoder, groups[:1], ["a cat"])
    assert built == []
    encode(encoder, groups, ["a cat", "a house"])
    assert built  # the padded batch
