"""`replicate_release`: the authors' stage-1/2 MLLM rows (256 tokens, reference tokens after the padding),
their gaussian LoRA init, and a record of the setting in the checkpoint; off, nothing changes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_train import example_data, settings, stage1_checkpoint  # noqa: F401 (fixtures)
from tiny_run import write_config

from easyref.cli import main
from easyref.prompting import RELEASE_ROW_LENGTH
from easyref.train.config import TrainConfig, load_config, parse_overrides
from easyref.train.models import MLLMInputBuilder, load_stage_models
from easyref.train.trainer import STATE_NAME, Trainer

INDICES = [0, 1]


def make_trainer(tiny_dirs, example_data, out, stage=1, **overrides) -> Trainer:  # noqa: F811
    return Trainer(TrainConfig(**settings(tiny_dirs, example_data, out, stage, **overrides)))


class LayerSpy:
    """What the aggregation layer was called with: its attention mask and its tokens' rotary angles."""

    def __init__(self, encoder):
        self.calls = []
        self.handle = encoder.aggregator.layers[-1].register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.calls.append({"mask": kwargs["attention_mask"], "cos": kwargs["position_embeddings"][0]})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def expected_cos(encoder, positions: torch.Tensor) -> torch.Tensor:
    probe = torch.zeros(1, dtype=encoder.dtype)
    return encoder.rotary_emb(probe, positions)[0]


def spy_on_loss(trainer: Trainer, batch) -> tuple[float, dict]:
    with LayerSpy(trainer.models.encoder) as spy:
        loss = trainer.evaluate_loss(batch)
    assert len(spy.calls) == 1
    return loss, spy.calls[0]


# ---------------------------------------------------------------------- stages 1-2: rows of 256 tokens
def test_stage1_rows_are_256_tokens_and_reference_tokens_follow_the_padding(tiny_dirs, example_data, tmp_path):  # noqa: F811
    trainer = make_trainer(tiny_dirs, example_data, tmp_path / "on", replicate_release=True)
    batch = trainer.fixed_batch(INDICES)
    inputs, encoder = batch.mllm_inputs, trainer.models.encoder
    n = encoder.config.num_reference_tokens
    assert inputs.input_ids.shape == (len(INDICES), RELEASE_ROW_LENGTH) and inputs.padded_to == RELEASE_ROW_LENGTH
    lengths = inputs.attention_mask.sum(-1)
    assert (lengths < RELEASE_ROW_LENGTH).all(), "the tiny rows are short: the rest of each row is padding"
    unpadded = MLLMInputBuilder(encoder)(batch.references, batch.texts)
    pad_id = encoder.tokenizer.pad_token_id
    for row, length in enumerate(lengths.tolist()):
        assert torch.equal(inputs.input_ids[row, :length], unpadded.input_ids[row, :length])
        assert (inputs.input_ids[row, length:] == pad_id).all() and not inputs.attention_mask[row, length:].any()

    _, call = spy_on_loss(trainer, batch)
    # every row the layer reads is 256 context tokens + the reference tokens, which sit at 256..319
    assert call["mask"].shape == (len(INDICES), 1, n, RELEASE_ROW_LENGTH + n)
    positions = torch.arange(RELEASE_ROW_LENGTH, RELEASE_ROW_LENGTH + n).expand(len(INDICES), -1)
    assert torch.equal(call["cos"], expected_cos(encoder, positions))
    # under the release's mask: each token sees its row's real tokens, never the padding, and the
    # reference tokens up to itself (its aggregation layer ran causally, attention_mode "official")
    allowed = call["mask"] == 0
    context = allowed[..., :RELEASE_ROW_LENGTH]
    assert torch.equal(context, inputs.attention_mask.bool()[:, None, None, :].expand_as(context))
    assert torch.equal(allowed[0, 0, :, RELEASE_ROW_LENGTH:], torch.ones(n, n, dtype=torch.bool).tril())


def test_default_rows_are_not_padded_to_256(tiny_dirs, example_data, tmp_path):  # noqa: F811
    off = make_trainer(tiny_dirs, example_data, tmp_path / "off")
    batch = off.fixed_batch(INDICES)
    inputs, n = batch.mllm_inputs, off.models.encoder.config.num_reference_tokens
    lengths = inputs.attention_mask.sum(-1)
    assert inputs.padded_to is None
    assert inputs.input_ids.shape[1] == int(lengths.max()) < RELEASE_ROW_LENGTH
    loss_off, call = spy_on_loss(off, batch)
    assert call["mask"].shape[-1] == inputs.input_ids.shape[1] + n
    positions = lengths[:, None] + torch.arange(n)  # each row's tokens continue its own sequence
    assert torch.equal(call["cos"], expected_cos(off.models.encoder, positions))

    # the same samples and weights with the flag: only the rows' layout differs, and it changes the loss
    on = make_trainer(tiny_dirs, example_data, tmp_path / "on", replicate_release=True)
    padded = on.fixed_batch(INDICES)
    assert torch.equal(padded.pixel_values, batch.pixel_values)
    assert on.evaluate_loss(padded) != loss_off


def test_a_row_longer_than_256_tokens_is_cut_at_256(tiny_dirs, example_data, tmp_path):  # noqa: F811
    trainer = make_trainer(tiny_dirs, example_data, tmp_path, replicate_release=True)
    encoder = trainer.models.encoder
    references = trainer.fixed_batch(INDICES).references
    texts = ["a shape", " ".join(["word"] * 2 * RELEASE_ROW_LENGTH)]
    whole = MLLMInputBuilder(encoder)(references, texts)
    assert int(whole.attention_mask[1].sum()) > RELEASE_ROW_LENGTH
    cut = MLLMInputBuilder(encoder, pad_to=RELEASE_ROW_LENGTH)(references, texts)
    assert cut.input_ids.shape == (2, RELEASE_ROW_LENGTH) and bool(cut.attention_mask[1].all())
    assert torch.equal(cut.input_ids[1], whole.input_ids[1, :RELEASE_ROW_LENGTH])
    with torch.no_grad():
        tokens = encoder.encode(cut)
    assert tokens.shape == (2, encoder.config.num_reference_tokens, encoder.config.mllm_hidden_size)
    with pytest.raises(ValueError, match="would cut its images"):
        MLLMInputBuilder(encoder, pad_to=4)(references, texts)


# ---------------------------------------------------------------------- stage 3: unchanged
def test_stage3_is_the_same_with_and_without_the_flag(tiny_dirs, example_data, stage1_checkpoint, tmp_path):  # noqa: F811
    start = {"init_from": str(stage1_checkpoint), "batch_size": 2}
    off = make_trainer(tiny_dirs, example_data, tmp_path / "off", 3, **start)
    on = make_trainer(tiny_dirs, example_data, tmp_path / "on", 3, replicate_release=True, **start)
    # the same samples for both (the data's own release quirks are not what is compared here)
    items = [off.dataset[(0, i)] for i in INDICES]
    batch_off, batch_on = off.collate_items(items), on.collate_items(items)
    assert batch_on.mllm_inputs.padded_to is None
    assert torch.equal(batch_on.mllm_inputs.input_ids, batch_off.mllm_inputs.input_ids)
    assert on.evaluate_loss(batch_on) == off.evaluate_loss(batch_off)


# ---------------------------------------------------------------------- LoRA init
def lora_weights(unet, kind: str) -> list[torch.Tensor]:
    return [p.detach() for name, p in unet.named_parameters() if f"lora_{kind}." in name]


@pytest.mark.parametrize("replicate", [True, False])
def test_lora_down_weights_start_gaussian_only_when_replicating(
    tiny_dirs,
    example_data,  # noqa: F811
    stage1_checkpoint,  # noqa: F811
    tmp_path,
    replicate,
):
    values = settings(tiny_dirs, example_data, tmp_path, 2, init_from=str(stage1_checkpoint))
    models = load_stage_models(TrainConfig(**values, replicate_release=replicate))
    rank = models.model_config.lora_rank
    downs = lora_weights(models.unet, "A")
    assert downs and all(not w.any() for w in lora_weights(models.unet, "B"))
    if replicate:
        pooled = torch.cat([w.flatten() for w in downs]).double()
        std = 1 / rank
        # six standard errors of a normal sample's mean (std / sqrt(N)) and std (std / sqrt(2N))
        count = pooled.numel()
        assert abs(float(pooled.mean())) < 6 * std / math.sqrt(count)
        assert abs(float(pooled.std()) - std) < 6 * std / math.sqrt(2 * count)
        # unbounded: a kaiming-uniform draw could never reach this far
        assert any(float(w.abs().max()) > 1 / math.sqrt(w.shape[1]) for w in downs)
    else:  # peft's kaiming-uniform (a = sqrt(5)): bounded by 1 / sqrt(fan_in)
        assert all(float(w.abs().max()) <= 1 / math.sqrt(w.shape[1]) for w in downs)


# ---------------------------------------------------------------------- the setting's way in and its record
def test_the_setting_round_trips_and_the_checkpoint_records_it(tiny_dirs, example_data, tmp_path):  # noqa: F811
    path = write_config(tmp_path / "run.yaml", settings(tiny_dirs, example_data, tmp_path / "run", max_steps=1))
    assert load_config(path).replicate_release is False
    assert load_config(path, parse_overrides(["replicate_release=true"])).replicate_release is True
    path.write_text(path.read_text() + "replicate_release: true\n")
    assert load_config(path).replicate_release is True

    assert main(["train", "--config", str(path)]) == 0
    final = tmp_path / "run" / "final"
    saved = json.loads((final / "easyref_config.json").read_text())
    assert saved["extra"]["training"] == {"stage1": {"replicate_release": True}}
    state = json.loads((tmp_path / "run" / "checkpoint-0000001" / STATE_NAME).read_text())
    assert state["config"]["replicate_release"] is True

    # a later stage keeps the earlier stages' record and adds its own
    values = settings(tiny_dirs, example_data, tmp_path / "s2", 2, init_from=str(final), max_steps=1)
    stage2 = load_stage_models(TrainConfig(**values))
    assert stage2.model_config.extra["training"] == {
        "stage1": {"replicate_release": True},
        "stage2": {"replicate_release": False},
    }
