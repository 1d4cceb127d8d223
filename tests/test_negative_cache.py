"""The negative branch stored with the adapter (`negative.safetensors`): the same pixels as computing it,
computed once per model rather than per process, invalidated by anything that changes it, and a file that
cannot be trusted is a log line and a recomputation, never a failed generation."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from conftest import shape_image
from model_checks import to_release_state_dict
from safetensors.torch import load_file, save_file

from easyref import EasyRefPipeline, ReferenceEncoder
from easyref import checkpoint as checkpoint_module
from easyref.bundled import bundled_model_dir
from easyref.checkpoint import (
    NEGATIVE_FORMAT,
    NEGATIVE_NAME,
    NEGATIVE_VERSION,
    NegativeStore,
    file_fingerprint,
    negative_entry_name,
    negative_runtime,
    negative_store_for,
)
from easyref.cli import main
from easyref.config import EasyRefConfig
from easyref.resolve import resolve_parts
from easyref.tiny import save_tiny_qwen2vl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def calls(monkeypatch):
    """How many times the negative branch is computed (`ReferenceEncoder.encode_negative`)."""
    count = {"n": 0}
    original = ReferenceEncoder.encode_negative

    def counted(self):
        count["n"] += 1
        return original(self)

    monkeypatch.setattr(ReferenceEncoder, "encode_negative", counted)
    return count


@pytest.fixture
def adapter(make_pipeline, tmp_path):
    folder = tmp_path / "adapter"
    make_pipeline(lora_rank=4).save_adapter(folder)
    return folder


def load(tiny_dirs, adapter, mllm=None, **kwargs) -> EasyRefPipeline:
    pipe = EasyRefPipeline.from_pretrained(tiny_dirs["sdxl"], mllm=mllm or tiny_dirs["qwen"], adapter=adapter, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe):
    refs = [shape_image("red"), shape_image("blue", "gray")]
    return pipe(refs, "a red circle", num_inference_steps=2, seed=0, output_type="np").images


def fresh(pipe) -> torch.Tensor:
    """The negative branch computed now, by this pipeline's encoder (bypassing every cache)."""
    with torch.no_grad():
        return pipe.reference_encoder.encode_negative()


def test_a_second_load_reads_the_stored_tokens_and_makes_the_same_pixels(tiny_dirs, adapter, calls):
    first = load(tiny_dirs, adapter)
    computed = generate(first)
    assert calls["n"] == 1 and (adapter / NEGATIVE_NAME).is_file()
    second = load(tiny_dirs, adapter)
    stored = generate(second)
    assert calls["n"] == 1  # the second process-worth of loading skipped the MLLM pass
    assert np.array_equal(stored, computed)
    assert torch.equal(second.negative_reference_tokens(), fresh(second))  # bit for bit, same dtype and device
    # a pipeline that never stores (as before this existed) makes the same pixels too
    plain = load(tiny_dirs, adapter)
    plain.negative_store = None
    assert np.array_equal(generate(plain), computed)


def test_the_file_says_what_it_was_computed_from(tiny_dirs, adapter):
    pipe = load(tiny_dirs, adapter)
    tokens = pipe.negative_reference_tokens()
    from safetensors import safe_open

    with safe_open(str(adapter / NEGATIVE_NAME), "pt") as handle:
        metadata = handle.metadata()
        names = list(handle.keys())
    assert metadata["format"] == NEGATIVE_FORMAT and metadata["version"] == NEGATIVE_VERSION
    assert set(json.loads(metadata["files"])) == {"adapter", "mllm"}
    assert names == [negative_entry_name(pipe.easyref_config, torch.float32, "cpu")]
    entry = json.loads(metadata[names[0]])
    assert entry["runtime"] == negative_runtime("cpu") and {"torch", "transformers", "easyref"} <= set(entry["runtime"])
    assert tuple(load_file(str(adapter / NEGATIVE_NAME))[names[0]].shape) == tuple(tokens.shape)


def test_new_weights_another_mllm_instruction_or_runtime_are_computed_again(
    tiny_dirs, adapter, make_pipeline, calls, tmp_path, monkeypatch
):
    load(tiny_dirs, adapter).negative_reference_tokens()
    assert calls["n"] == 1
    # fields that cannot change the branch (the SDXL side, limits) still find it
    load(tiny_dirs, adapter, config_overrides={"max_references": 3}).negative_reference_tokens()
    assert calls["n"] == 1
    make_pipeline(seed=1, lora_rank=4).save_adapter(adapter)  # retrained in place: same names, shapes and sizes
    retrained = load(tiny_dirs, adapter)
    assert torch.equal(retrained.negative_reference_tokens(), fresh(retrained)) and calls["n"] == 3
    load(tiny_dirs, adapter).negative_reference_tokens()
    assert calls["n"] == 3  # and stored for the retrained weights
    overridden = load(tiny_dirs, adapter, config_overrides={"negative_instruction": "Nothing: {prompt}"})
    assert torch.equal(overridden.negative_reference_tokens(), fresh(overridden)) and calls["n"] == 5
    load(tiny_dirs, adapter).negative_reference_tokens()
    assert calls["n"] == 5  # both configs' entries are kept
    other_mllm = save_tiny_qwen2vl(tmp_path / "qwen-seed1", seed=1)
    elsewhere = load(tiny_dirs, adapter, mllm=other_mllm)
    assert torch.equal(elsewhere.negative_reference_tokens(), fresh(elsewhere)) and calls["n"] == 7
    load(tiny_dirs, adapter).negative_reference_tokens()
    assert calls["n"] == 8  # the other MLLM's replaced them: computed and stored again
    # other versions (or another CPU instruction set) compute it again
    changed = {**negative_runtime("cpu"), "torch": "0.0.0"}
    monkeypatch.setattr(checkpoint_module, "negative_runtime", lambda device: changed)
    load(tiny_dirs, adapter).negative_reference_tokens()
    assert calls["n"] == 9


def test_changed_encoder_weights_in_process_are_not_served_from_the_file(tiny_dirs, adapter, calls):
    pipe = load(tiny_dirs, adapter)
    before = pipe.negative_reference_tokens()
    with torch.no_grad():
        pipe.reference_encoder.aggregator.reference_tokens.add_(1.0)
    pipe.clear_reference_cache()  # as documented after changing the encoder's weights
    after = pipe.negative_reference_tokens()
    assert not torch.equal(before, after) and torch.equal(after, fresh(pipe))


def _write(path, tensors: dict, metadata: dict) -> None:
    save_file(tensors, str(path), metadata=metadata)


def _valid_metadata(pipe, name: str) -> dict:
    key, files = pipe.negative_store.weights()
    entry = {"config": checkpoint_module.negative_config_key(pipe.easyref_config), "runtime": negative_runtime("cpu")}
    return {
        "format": NEGATIVE_FORMAT,
        "version": NEGATIVE_VERSION,
        "weights": key,
        "files": json.dumps(files),
        name: json.dumps(entry),
    }


class _Payload:
    """What a hostile pickle holds: unpickling it creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


HOSTILE = ["wrong shape", "nan", "wrong dtype", "bad metadata", "bad entry metadata", "pickle", "truncated"]
HOSTILE += ["folder", "fifo", "huge", "empty"]


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_negative_file_is_a_log_line_and_a_recomputation(tiny_dirs, adapter, calls, caplog, tmp_path, case):
    pipe = load(tiny_dirs, adapter)
    expected = generate(pipe)
    name = negative_entry_name(pipe.easyref_config, torch.float32, "cpu")
    path = adapter / NEGATIVE_NAME
    good = load_file(str(path))[name]
    metadata = _valid_metadata(pipe, name)
    marker = tmp_path / "unpickled"
    path.unlink()
    if case == "wrong shape":
        _write(path, {name: good[:, :3]}, metadata)
    elif case == "nan":
        _write(path, {name: torch.full_like(good, float("nan"))}, metadata)
    elif case == "wrong dtype":
        _write(path, {name: good.double()}, metadata)
    elif case == "bad metadata":
        _write(path, {name: good}, {**metadata, "format": "something else"})
    elif case == "bad entry metadata":
        _write(path, {name: good}, {**metadata, name: "{not json"})
    elif case == "pickle":
        path.write_bytes(pickle.dumps({name: _Payload(marker)}))
    elif case == "truncated":
        _write(path, {name: good}, metadata)
        path.write_bytes(path.read_bytes()[:-100])
    elif case == "folder":
        path.mkdir()
    elif case == "fifo":
        os.mkfifo(path)  # reading it would block: it must not be opened
    elif case == "huge":
        with open(path, "wb") as handle:
            handle.truncate(checkpoint_module.NEGATIVE_MAX_BYTES + 1)  # sparse: no disk used
    elif case == "empty":
        path.write_bytes(b"")
    before = calls["n"]
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="easyref"):
        again = load(tiny_dirs, adapter)
        images = generate(again)
    assert np.array_equal(images, expected)
    assert calls["n"] == before + 1  # computed, not taken from the file
    assert not marker.exists()  # never unpickled
    assert any(str(path) in r.getMessage() for r in caplog.records), caplog.text
    if case != "folder":  # a folder in its place stays; anything else is replaced by a good file
        assert torch.equal(load_file(str(path))[name], good)


def test_a_folder_that_cannot_be_written_never_fails_a_generation(tiny_dirs, adapter, calls, caplog, monkeypatch):
    from easyref import safe_io

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(safe_io, "atomic_write_bytes", refuse)
    with caplog.at_level(logging.DEBUG, logger="easyref"):
        images = generate(load(tiny_dirs, adapter))
    assert np.isfinite(images).all() and not (adapter / NEGATIVE_NAME).exists()
    assert "could not store the negative branch" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "negative" in r.getMessage()]


def test_the_bundled_model_and_hub_snapshots_are_read_only_and_nothing_ships(tmp_path):
    parts = resolve_parts("default", "default", "default")
    store = negative_store_for(parts)
    assert store is not None and not store.writable
    # decided: no negative file in the package (0.1 s of the bundled model's start, and a file that matches
    # only the torch, transformers and CPU it was made with); the package folder is never written either
    assert not (bundled_model_dir() / "adapter" / NEGATIVE_NAME).exists()
    assert not NegativeStore(tmp_path, tmp_path, writable=False).save(EasyRefConfig(), torch.zeros(1, 64, 1536))
    assert not (tmp_path / NEGATIVE_NAME).exists()


def test_fingerprints_see_a_retrained_tensor_without_reading_whole_files(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "FULL_HASH_BYTES", 1024)  # as if these were gigabytes
    tensors = {"a": torch.zeros(4096), "b": torch.arange(50000, dtype=torch.float32), "c": torch.ones(3)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    base = file_fingerprint(tmp_path / "w.safetensors")
    shutil.copy(tmp_path / "w.safetensors", tmp_path / "copy.safetensors")  # another path and time: same
    assert file_fingerprint(tmp_path / "copy.safetensors") == base
    for key in tensors:  # any one tensor retrained (every value moved) changes it
        changed = {**tensors, key: tensors[key] + 0.5}
        save_file(changed, str(tmp_path / "w.safetensors"))
        assert file_fingerprint(tmp_path / "w.safetensors") != base, key


def test_convert_stores_the_negative_branch_that_generate_would_compute(make_pipeline, tiny_dirs, tmp_path, calls):
    release = tmp_path / "release"
    release.mkdir()
    save_file(to_release_state_dict(make_pipeline(lora_rank=4)), str(release / "model.safetensors"))
    out = tmp_path / "converted"
    assert main(["convert", str(release), str(out), "--mllm", str(tiny_dirs["qwen"]), "--device", "cpu"]) == 0
    assert (out / NEGATIVE_NAME).is_file() and calls["n"] == 1
    pipe = load(tiny_dirs, out)
    stored = pipe.negative_reference_tokens()
    assert calls["n"] == 1 and torch.equal(stored, fresh(pipe))
    skipped = tmp_path / "skipped"
    assert main(["convert", str(release), str(skipped), "--mllm", str(tiny_dirs["qwen"]), "--no-negative"]) == 0
    assert not (skipped / NEGATIVE_NAME).exists()


def test_training_stores_the_negative_branch_with_its_checkpoints(tiny_dirs, tmp_path, calls):
    from easyref.train.config import TrainConfig
    from easyref.train.example import write_example_data
    from easyref.train.trainer import Trainer

    root = tmp_path / "data"
    paths = write_example_data(root, subjects=2, per_subject=2, size=48)
    settings = dict(
        stage=1,
        base=str(tiny_dirs["sdxl"]),
        mllm=str(tiny_dirs["qwen"]),
        output_dir=str(tmp_path / "run"),
        data=str(paths["pairs"]),
        data_root=str(root),
        resolution=32,
        bucket_stride=16,
        reference_image_size=56,
        max_references=4,
        num_workers=0,
        mixed_precision="no",
        gradient_checkpointing=False,
        batch_size=2,
        max_steps=2,
        checkpoint_every=1,
        tensorboard=False,
    )
    final = Trainer(TrainConfig(**settings)).train()
    checkpoints = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert checkpoints and all((c / "model" / NEGATIVE_NAME).is_file() for c in checkpoints)
    assert (final / NEGATIVE_NAME).is_file()
    written = calls["n"]
    for folder in (final, checkpoints[0] / "model"):
        pipe = load(tiny_dirs, folder)
        stored = pipe.negative_reference_tokens()
        assert calls["n"] == written and torch.equal(stored, fresh(pipe))
        written = calls["n"]
