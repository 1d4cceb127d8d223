"""Shared fixtures: tiny random SDXL and Qwen2-VL folders, saved once and loaded like real ones."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch
from PIL import Image, ImageDraw

from easyref import EasyRefConfig, EasyRefPipeline, ReferenceEncoder
from easyref.tiny import save_tiny_qwen2vl, save_tiny_sdxl

torch.set_num_threads(2)

# `slow`: the tests `make test-fast` leaves out (`-m "not slow"`), each over ~1 s on a 2-core machine (over
# its parameter cases together, for the last few), so that the rest, the inner loop, stays under a minute.
# Named here rather than decorated in place so the list is in one file; tests/test_presets.py checks every
# name still exists. Seconds from `pytest --durations` (partly on a busy machine).
SLOW_TESTS = {
    "test_bench_kill.py::test_killed_and_resumed_runs_end_bit_identical",  # 23 s: kill -9 and resume, subprocesses
    "test_bench_run.py::test_run_makes_scores_and_summarizes_every_image",  # 17 s
    "test_train.py::test_loss_decreases_on_a_fixed_batch",  # 17 s
    "test_train.py::test_resume_continues_exactly",  # 14 s
    "test_bench_shapes.py::test_bench_shapes_runs_end_to_end_on_the_smoke_recipe",  # 13 s: the whole smoke build
    "test_train.py::test_two_processes_equal_one_with_the_doubled_batch",  # 8 s: two processes
    "test_train_bad_input.py::test_fifo_image_with_keep_aspect_does_not_hang",  # 5.5 s: a subprocess
    "test_generate_bad_input.py::test_long_prompt_memory_is_bounded",  # 5.5 s: a subprocess
    "test_generate_bad_input.py::test_fifo_reference_is_refused_without_hanging",  # 3.5 s: a subprocess
    "test_shapes.py::test_vae_training_lowers_reconstruction_loss",  # 3 s
    "test_train.py::test_three_stages_through_the_cli_then_generate",  # 2 s
    "test_shapes.py::test_a_base_continues_where_it_stopped_and_stale_stages_go",  # 1.8 s
    "test_shapes_mllm.py::test_build_mllm_writes_its_record_and_replaces_atomically",  # 1.7 s
    "test_bench_run.py::test_cli_run_easyref_then_score_the_images_elsewhere",  # 1.5 s
    "test_train.py::test_bad_images_are_reported_or_fatal",  # 1.4 s
    "test_shapes_mllm.py::test_build_mllm_sizes_the_vision_tower_and_records_both_phases",  # 1.2 s
    "test_shapes.py::test_base_model_trains_and_loads_as_an_sdxl_folder",  # 1.2 s
    "test_shapes_mllm.py::test_pretraining_lowers_the_caption_loss_and_keeps_a_loadable_folder",  # 1.2 s
    "test_shapes_mllm.py::test_grounding_pretraining_lowers_its_loss",  # 30 steps of multi-image batches
    "test_train.py::test_example_recipes_run_on_the_bundled_model",  # 1.2 s
    "test_train.py::test_every_model_setting_reaches_the_checkpoint_from_the_command_line",  # two stages
    "test_train_bad_input.py::test_deeply_nested_input_is_one_line",  # 2 x 1 s: subprocesses
    "test_shapes_oracle.py::test_short_training_lowers_the_loss",  # 1 s
    "test_cli_fast.py::test_a_normal_run_is_quiet_and_offline",  # 5.4 s: a generate subprocess
    "test_resolve.py::test_the_trainer_records_its_parts_and_prints_a_command_that_runs",  # 1.4 s
    "test_release.py::test_release_import_round_trip",  # 1.5 s in all
    "test_train.py::test_exactly_the_intended_parameters_change",  # 1.3 s in all
    "test_bench_bad_input.py::test_a_half_finished_group_resumes_to_the_same_pixels",  # 1.3 s in all
    "test_checkpoint.py::test_save_load_bit_exact",  # 1 s in all
    "test_train.py::test_text_cache_and_bf16_autocast",  # 0.9 s
    "test_cli.py::test_same_seed_same_image",  # 0.8 s
    "test_gpu_suite.py::test_the_gpu_suite_runs_every_section_in_smoke_mode",  # 23 s: four benchmark scripts
    "test_pipeline.py::test_a_compiled_unet_with_the_adapter_gives_the_same_images",  # 12 s: dynamo tracing
    "test_readme.py::test_the_readme_commands_run_as_written",  # 6 s: every runnable README command, fake hub
    "test_shapes.py::test_a_base_reuses_a_finished_vae_and_trains_in_chunks",  # two base builds
    "test_shapes_kinds.py::test_training_data_holds_every_kind",  # renders 36 groups
    # `easyref serve` in a subprocess (7 s to start), then the page in Chromium and its API
    "test_serve.py::test_api_writes_the_pngs_generate_writes_compared_and_zipped",
    "test_serve.py::test_api_scheduler_choice_changes_the_image_and_the_default_does_not",
    "test_serve.py::test_api_random_seed_is_reported_and_reproduces",
    "test_serve.py::test_api_refuses_bad_requests_in_one_line_and_keeps_serving",
    "test_serve.py::test_the_page_generates_explains_and_reports_bad_files",  # 3.3 s
    "test_serve.py::test_the_examples_row_loads_the_demo_groups_and_a_waiting_tab_sees_its_place",  # 19 s: a queue
    "test_serve.py::test_ctrl_c_stops_the_server",
    "test_demo_group.py::test_the_bundled_model_draws_the_demo_subjects_with_references_and_not_without",  # 9 s
    "test_serve.py::test_sigterm_during_a_generation_stops_cleanly_and_removes_the_temporary_folders",  # a 2nd server
    "test_serve.py::test_the_page_serves_only_the_files_a_request_made",
    "test_serve.py::test_links_planted_in_the_output_folder_are_never_written_through",
    "test_serve.py::test_sigterm_while_the_model_loads_exits_cleanly",  # 3 s: a server that never serves
    "test_serve.py::test_a_cancelled_request_stops_and_the_next_is_unaffected",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if f"{item.path.name}::{getattr(item, 'originalname', item.name)}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: a second intra-op thread only waits on a busy core (70x slower under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"sdxl": save_tiny_sdxl(root / "sdxl"), "qwen": save_tiny_qwen2vl(root / "qwen2vl")}


def tiny_config(qwen_dir, **overrides) -> EasyRefConfig:
    values = dict(
        mllm=str(qwen_dir), mllm_hidden_size=64, cross_attention_dim=64, reference_image_size=56, max_references=6
    )
    values.update(overrides)
    return EasyRefConfig(**values)


@pytest.fixture
def make_encoder(tiny_dirs):
    def make(seed: int = 0, **overrides) -> ReferenceEncoder:
        torch.manual_seed(seed)
        return ReferenceEncoder.from_pretrained(tiny_dirs["qwen"], tiny_config(tiny_dirs["qwen"], **overrides)).eval()

    return make


@pytest.fixture
def make_sdxl(tiny_dirs):
    def make(cls_name: str = "StableDiffusionXLPipeline"):
        import diffusers

        pipe = getattr(diffusers, cls_name).from_pretrained(tiny_dirs["sdxl"])
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make


@pytest.fixture
def make_pipeline(make_encoder, make_sdxl):
    def make(seed: int = 0, lora_rank: int = 0, randomize: bool = True, **overrides) -> EasyRefPipeline:
        pipe = EasyRefPipeline.from_components(make_sdxl(), make_encoder(seed, lora_rank=lora_rank, **overrides))
        if randomize:
            randomize_adapter(pipe.unet, seed)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make


def randomize_adapter(unet, seed: int) -> None:
    """Give k/v and LoRA weights random values so that the reference path visibly matters."""
    from easyref.adapter import adapter_parameters

    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for param in adapter_parameters(unet):
            param.add_(0.2 * torch.randn(param.shape, generator=gen))


def shape_image(color, background="white", size=(60, 44), box=(10, 8, 40, 36)) -> Image.Image:
    image = Image.new("RGB", size, background)
    ImageDraw.Draw(image).ellipse(box, fill=color)
    return image


@pytest.fixture
def groups():
    return [
        [shape_image("red"), shape_image("red", "gray", (40, 70)), shape_image("red", "yellow")],
        [shape_image("blue", "black", (50, 50))],
    ]


BOMB_SIDE = 9000  # 81 M pixels: under PIL's own bomb guard, over easyref's bound


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = BOMB_SIDE, height: int = BOMB_SIDE, rows: int | None = None) -> bytes:
    """A valid 1-bit greyscale PNG of zeros: ~10 kB on disk, `width * height` pixels decoded. Only `rows`
    rows are stored when given (a header that promises more than the file holds). Compressed row by row,
    so making it never holds more than one row."""
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height if rows is None else rows)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
