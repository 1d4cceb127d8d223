"""The accelerate training loop: one stage, exact resume, atomic checkpoints, logs, validation grids.

Every random draw is a function of (seed, epoch, sample index): augmentation in the dataset, noise,
timestep and VAE sample here. So a resumed run repeats the uninterrupted one, and N processes with
batch B see the same samples, noise and update as one process with batch N * B.

Bad input ends in one line, before the expensive work wherever it can be seen up front: the output
folder (symlinks planted where the trainer writes, files where folders belong), the data, the
validation images and a `--resume` checkpoint (every pickle in it must load with
`weights_only=True`) are all checked before the models are loaded. Everything written into the
output folder refuses symlinks and goes through a temporary name; temporary files a killed run left
behind are removed by the next one. A run whose share of skipped (missing, unreadable) samples
exceeds `max_skip_fraction` stops without writing `final/`. A full disk is one line, exit code 1.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
import random
import re
import resource
import shlex
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate.utils import DistributedType

from ..checkpoint import WEIGHTS_NAME, CheckpointError, apply_checkpoint, save_checkpoint
from ..release import read_checkpoint
from ..safe_io import (
    LOCK_NAME,
    JSONFileError,
    RunLock,
    append_line,
    check_no_symlink,
    clean_stale_temps,
    describe_os_error,
    is_disk_error,
    load_json,
    replace_folder,
)
from .config import STAGE_NAMES, ConfigError, TrainConfig, check_data_root, save_config
from .data import DataError, DataSettings, RankBatchSampler, TrainDataset, collate, global_batches, load_records
from .models import (
    MLLMInputBuilder,
    StageModels,
    TrainingModel,
    cast_frozen,
    denoising_loss,
    load_stage_models,
    mllm_pad_length,
    select_trainables,
)

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
FINAL_NAME = "final"
STATE_NAME = "trainer_state.json"
CONFIG_FILE = "train_config.yaml"
METRICS_FILE = "metrics.jsonl"
VALIDATION_DIR = "validation"
TRACKER_DIR = "easyref"  # accelerate's tensorboard run folder (init_trackers("easyref"))
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SKIP_WINDOW = 16  # the first samples of an epoch that may not all fail (at least one global batch)
SKIP_REASONS_SHOWN = 3
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".bin")
MAX_HINT_REFERENCES = 3  # references in the `easyref generate` command printed at the end


class OutputWriteError(Exception):
    """Writing into the output folder failed (disk full, quota, permissions): one line, exit code 1."""


@dataclass
class TrainState:
    """Where the run is: optimizer steps done, and the data position (epoch, global batches consumed)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    samples: int = 0
    skipped: int = 0  # samples of the current epoch skipped so far, over all processes


@dataclass
class ResumePoint:
    """A checkpoint read and checked in full before any model is loaded."""

    folder: Path
    state: TrainState
    saved_config: dict
    model: tuple  # (EasyRefConfig, tensors)
    optimizer: dict | None  # None: DeepSpeed's state lives in folder/accelerate
    scheduler: dict | None
    rng: dict | None  # this process's global generators


class CollateForTraining:
    """Worker-side collate: stack the samples, then tokenise and preprocess their reference groups."""

    def __init__(self, build_inputs: MLLMInputBuilder):
        self.build_inputs = build_inputs

    def __call__(self, items):
        batch = collate(items)
        batch.mllm_inputs = self.build_inputs(batch.references, batch.texts) if len(batch) else None
        return batch


class Trainer:
    """`Trainer(config).train()` runs one stage to `config.max_steps` and returns the final checkpoint."""

    def __init__(
        self,
        config: TrainConfig,
        resume: str | None = None,
        cpu: bool | None = None,
        models: StageModels | None = None,
        model_class: type[TrainingModel] = TrainingModel,
    ):
        """`models` and `model_class` let benchmarks and notebooks supply models built in memory."""
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import set_seed

        # accelerate keeps one process-wide state; a second run in the same process (stage 1, then
        # stage 2 in a notebook) may use another precision. The distributed set-up itself is kept.
        AcceleratorState._reset_state()
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with=_trackers(config),
            project_dir=str(self.output_dir),
            cpu=bool(cpu),  # otherwise accelerate decides (and a DeepSpeed launch stays DeepSpeed)
        )
        set_seed(config.seed)
        self.state = TrainState()
        self._skip_reasons: list[str] = []
        self._epoch_sizes: dict[int, int] = {}
        self._resumed_step: int | None = None
        # everything that can be checked without the models, before loading them
        check_output_dir(self.output_dir)
        _check_init_from(config, self.output_dir)
        self.dataset = self._dataset()
        self._check_data()
        self.validation_references = _check_validation_references(config)
        point = read_resume_point(self.output_dir, resume, self.accelerator.process_index) if resume else None
        if point and point.state.step > config.max_steps:
            raise ConfigError(
                f"--resume {point.folder}: the checkpoint is at step {point.state.step}, past max_steps "
                f"{config.max_steps}; raise max_steps (--max-steps N)"
            )
        self.models = models or load_stage_models(config)
        self.model_class = model_class
        self.trainables = select_trainables(self.models, config.stage)
        if point:
            self._load_model_state(point)
        self._prepare()
        if point:
            self._load_optimizer_state(point)

    # ------------------------------------------------------------------ set-up
    def _dataset(self) -> TrainDataset:
        c = self.config
        settings = DataSettings.from_config(c)
        records = load_records(c.data)
        self._example = records[0] if records else None  # for the command printed at the end
        root = Path(c.data_root)
        check_data_root(root)
        try:
            # never strict here: fail_on_bad_data is applied in this process (see _count_skips), since an
            # error raised in a data-loader worker would arrive wrapped in a multi-line traceback
            return TrainDataset(records, root, settings, c.allow_outside_root, strict=False)
        except DataError as err:
            raise DataError(f"{c.data}: {err}") from None

    def _prepare(self) -> None:
        c, models = self.config, self.models
        acc = self.accelerator
        weight_dtype = DTYPES[c.mixed_precision]
        cast_frozen(models, weight_dtype, c.stage)
        if c.gradient_checkpointing:
            models.encoder.gradient_checkpointing_enable()
            models.unet.enable_gradient_checkpointing()
        models.vae.to(acc.device, torch.float32)
        models.text_pipe.text_encoder.to(acc.device)
        models.text_pipe.text_encoder_2.to(acc.device)
        params = [p for _, p in self.trainables]
        optimizer = torch.optim.AdamW(
            params,
            lr=c.learning_rate,
            betas=(c.adam_beta1, c.adam_beta2),
            eps=c.adam_epsilon,
            weight_decay=c.weight_decay,
        )
        from diffusers.optimization import get_scheduler

        plugin = acc.state.deepspeed_plugin
        if plugin is not None:  # our loader is not prepared by accelerate, so DeepSpeed is told the batch
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = c.batch_size
        # stepped once per optimizer step by us (accelerate's wrapper would step it once per process)
        self.lr_scheduler = get_scheduler(c.lr_scheduler, optimizer, num_warmup_steps=c.lr_warmup_steps)
        self.model, self.optimizer = acc.prepare(self.model_class(models.encoder, models.unet), optimizer)
        self.model.train()
        self.text_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if acc.is_main_process and acc.log_with:
            acc.init_trackers("easyref", config=_flat_config(c))

    @property
    def global_batch(self) -> int:
        return self.config.batch_size * self.accelerator.num_processes

    # ------------------------------------------------------------------ the loop
    def train(self) -> Path:
        """Train to max_steps, then write OUTPUT_DIR/final (only if the run succeeded)."""
        with self._output_lock():
            if self.accelerator.is_main_process:
                self._clean_stale_temps()
            self.fit(self.config.max_steps)
            final = self._save_final()
        self.accelerator.end_training()
        return final

    @contextmanager
    def _output_lock(self):
        """One training process per output folder (the main process holds the lock)."""
        if not self.accelerator.is_main_process:
            yield
            return
        lock = RunLock(self.output_dir, "training output folder")
        with _writing(self.output_dir):
            lock.__enter__()
        try:
            yield
        finally:
            lock.__exit__(None, None, None)

    def _clean_stale_temps(self) -> None:
        """Temporary files and folders a killed run left (mid-checkpoint, mid-final) are removed."""
        out = self.output_dir
        folders = [out, out / FINAL_NAME, out / VALIDATION_DIR]
        for checkpoint in out.glob(f"{CHECKPOINT_PREFIX}*"):
            folders += [checkpoint, checkpoint / "model"]
        for folder in folders:
            if folder.is_dir() and not folder.is_symlink():
                clean_stale_temps(folder)

    def fit(self, max_steps: int) -> None:
        """Optimizer steps until `max_steps` (checkpoints, logs and validation on their schedules)."""
        c, acc = self.config, self.accelerator
        if acc.is_main_process:
            with _writing(self.output_dir):
                self.output_dir.mkdir(parents=True, exist_ok=True)
                save_config(c, self.output_dir / CONFIG_FILE, root=self.output_dir)
            logger.info(
                "stage %d (%s): %d records, %d trainable tensors (%s parameters), global batch %d x %d accumulation",
                c.stage,
                STAGE_NAMES[c.stage],
                len(self.dataset),
                len(self.trainables),
                f"{sum(p.numel() for _, p in self.trainables):,}",
                self.global_batch,
                c.gradient_accumulation_steps,
            )
        progress = _progress(max_steps, self.state.step, acc.is_main_process)
        meter = _Meter()
        from tqdm.contrib.logging import logging_redirect_tqdm

        # log lines (epoch summaries) above the bar, not glued to it; the bar is closed on errors too,
        # so the one error line starts a line of its own
        with logging_redirect_tqdm(), _closing(progress):
            while self.state.step < max_steps:
                for batch, data_time in self._epoch_batches():
                    meter.add_data_time(data_time)
                    loss = self._micro_step(batch)
                    if len(batch):  # a batch of only skipped samples trained nothing: no loss to report
                        meter.add(loss, len(batch))
                    self.state.batch += 1
                    self.state.samples += len(batch) * acc.num_processes
                    self._count_skips(batch)
                    self._judge_skips(finished=False)
                    if acc.sync_gradients:
                        self.state.step += 1
                        progress.update(1)
                        self._after_step(meter, progress)
                        if self.state.step >= max_steps:
                            break
                else:
                    self._end_epoch()
        if self.state.batch:  # the run ends inside an epoch: summarise and judge what it saw
            self._log_skips()
            self._judge_skips(finished=True)

    def _check_data(self) -> None:
        count = self._epoch_size(0)
        if count == 0:
            raise ValueError(
                f"{self.config.data}: {len(self.dataset)} records do not fill one global batch of {self.global_batch}"
                " (per target-size bucket); add data or lower batch_size"
            )

    def _epoch_batches(self):
        """This process's batches from the current data position to the end of the epoch."""
        c, acc = self.config, self.accelerator
        sampler = RankBatchSampler(
            self.dataset,
            self.global_batch,
            acc.num_processes,
            acc.process_index,
            c.seed,
            self.state.epoch,
            start=self.state.batch,
        )
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=sampler,
            collate_fn=self._collate(),
            num_workers=c.num_workers,
        )
        started = time.perf_counter()
        for batch in loader:
            yield batch, time.perf_counter() - started
            started = time.perf_counter()

    def _epoch_size(self, epoch: int) -> int:
        """Samples in one epoch (all processes): whole global batches, per target-size bucket."""
        if epoch not in self._epoch_sizes:
            batches = global_batches(self.dataset, self.global_batch, self.config.seed, epoch)
            self._epoch_sizes[epoch] = sum(len(b) for b in batches)
        return self._epoch_sizes[epoch]

    def _end_epoch(self) -> None:
        self._log_skips()
        self._judge_skips(finished=True)
        self.state.epoch += 1
        self.state.batch = 0
        self.state.skipped = 0
        self._skip_reasons = []

    # ------------------------------------------------------------------ skipped samples
    def _count_skips(self, batch) -> None:
        """Add this micro-batch's skipped samples (summed over processes, so every process judges alike)."""
        acc = self.accelerator
        skipped = len(batch.skipped)
        if acc.num_processes > 1:
            skipped = int(acc.reduce(torch.tensor([skipped], device=acc.device), reduction="sum").item())
        self.state.skipped += skipped
        for item in batch.skipped:
            if len(self._skip_reasons) < SKIP_REASONS_SHOWN:
                self._skip_reasons.append(_one_line(f"{item.path}: {item.reason}"))
        if skipped and self.config.fail_on_bad_data:
            where = (
                f"{batch.skipped[0].path} (record index {batch.skipped[0].key[1]}): {batch.skipped[0].reason}"
                if batch.skipped
                else "a sample on another process"
            )
            raise DataError(_one_line(f"{where}; fail_on_bad_data is set, so the run stops"))

    def _seen(self) -> int:
        return min(self.state.batch * self.global_batch, self._epoch_size(self.state.epoch))

    def _skip_summary(self) -> str:
        state, seen, size = self.state, self._seen(), self._epoch_size(self.state.epoch)
        span = f"epoch {state.epoch}" if seen >= size else f"epoch {state.epoch} (first {seen} of {size} samples)"
        share = state.skipped / seen if seen else 0.0
        text = (
            f"{span}: {state.skipped} samples skipped of {seen} ({share:.1%}; "
            f"max_skip_fraction {self.config.max_skip_fraction:g})"
        )
        if self._skip_reasons:
            text += "; first: " + "; ".join(self._skip_reasons)
        return text

    def _log_skips(self) -> None:
        if self.accelerator.is_main_process:
            logger.log(logging.WARNING if self.state.skipped else logging.INFO, "%s", self._skip_summary())

    def _judge_skips(self, finished: bool) -> None:
        size = self._epoch_size(self.state.epoch)
        window = min(size, max(SKIP_WINDOW, self.global_batch))
        why = skip_verdict(self.state.skipped, self._seen(), size, self.config.max_skip_fraction, window, finished)
        if why:
            raise DataError(
                f"too many samples skipped ({why}): {self._skip_summary()}; fix or remove those records, or "
                "allow more with --set max_skip_fraction=X (1 = never stop); no final checkpoint was written"
            )

    def _micro_step(self, batch) -> float:
        acc = self.accelerator  # skipped samples were already logged, one line each, by `collate`
        with acc.accumulate(self.model):
            loss = self._loss(batch) if len(batch) else _zero_loss(self.trainables)
            acc.backward(loss)
            if acc.sync_gradients and self.config.max_grad_norm > 0:
                acc.clip_grad_norm_([p for _, p in self.trainables], self.config.max_grad_norm)
            self.optimizer.step()
            if acc.sync_gradients:
                self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def _loss(self, batch) -> torch.Tensor:
        models, acc = self.models, self.accelerator
        device = acc.device
        generators = [torch.Generator().manual_seed(seed) for seed in batch.noise_seeds]
        with torch.no_grad():
            latents = _encode_latents(models.vae, batch.pixel_values.to(device), generators)
            prompt_embeds, pooled = self._text_embeds(batch.texts)
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators]).to(device)
        if self.config.noise_offset:
            offsets = torch.stack([torch.randn(latents.shape[1], 1, 1, generator=g) for g in generators])
            noise = noise + self.config.noise_offset * offsets.to(device)
        steps = models.noise_scheduler.config.num_train_timesteps
        timesteps = torch.cat([torch.randint(0, steps, (1,), generator=g) for g in generators]).to(device)
        time_ids = batch.time_ids.to(device, prompt_embeds.dtype)
        inputs = batch.mllm_inputs.to(device)

        def predict(noisy):
            with acc.autocast():
                return self.model(inputs, noisy, timesteps, prompt_embeds, pooled, time_ids)

        return denoising_loss(predict, models.noise_scheduler, latents, noise, timesteps)

    def fixed_batch(self, indices: list[int], epoch: int = 0):
        """The samples at these dataset indices, collated exactly as the loop would (for evaluation)."""
        return self.collate_items([self.dataset[(epoch, i)] for i in indices])

    def collate_items(self, items):
        """Dataset samples collated exactly as the loop would (the MLLM rows as this stage lays them out)."""
        return self._collate()(items)

    def _collate(self) -> CollateForTraining:
        """The batches' collate: the MLLM rows laid out as this stage trains them (`mllm_pad_length`)."""
        return CollateForTraining(MLLMInputBuilder(self.models.encoder, pad_to=mllm_pad_length(self.config)))

    def evaluate_loss(self, batch) -> float:
        """The training loss on a batch, with its fixed per-sample noise, without updating anything."""
        with torch.no_grad():
            return float(self._loss(batch))

    def _text_embeds(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's own prompt encoding (penultimate CLIP states, pooled from encoder 2), optionally cached."""
        if not self.config.cache_text_embeds:
            return self._encode_prompts(texts)
        missing = sorted({t for t in texts if t not in self.text_cache})
        if missing:
            embeds, pooled = self._encode_prompts(missing)
            for i, text in enumerate(missing):
                self.text_cache[text] = (embeds[i].cpu(), pooled[i].cpu())
        device = self.accelerator.device
        embeds = torch.stack([self.text_cache[t][0] for t in texts]).to(device)
        pooled = torch.stack([self.text_cache[t][1] for t in texts]).to(device)
        return embeds, pooled

    def _encode_prompts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = self.models.text_pipe.encode_prompt(
            prompt=texts, device=self.accelerator.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return embeds, pooled

    # ------------------------------------------------------------------ after each step
    def _after_step(self, meter: _Meter, progress) -> None:
        c, step = self.config, self.state.step
        if step % c.log_every == 0 or step == c.max_steps:
            self._log(meter.flush(self.accelerator), progress)
        if step % c.checkpoint_every == 0 and step < c.max_steps:
            self.save_checkpoint()
        if c.validation_every and step % c.validation_every == 0:
            self.validate()

    def _log(self, metrics: dict, progress) -> None:
        acc = self.accelerator
        metrics.update(step=self.state.step, lr=self.lr_scheduler.get_last_lr()[0], peak_memory_gib=_peak_memory_gib())
        if not acc.is_main_process:
            return
        loss = metrics["loss"]
        progress.set_postfix(loss="n/a" if loss is None else f"{loss:.4f}", sps=f"{metrics['samples_per_s']:.2f}")
        path = self.output_dir / METRICS_FILE
        with _writing(path):
            append_line(path, json.dumps(metrics) + "\n", self.output_dir)
        if acc.log_with:
            acc.log({k: v for k, v in metrics.items() if k != "step" and v is not None}, step=self.state.step)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """checkpoint-N/{model (inference format), optimizer.pt, scheduler.pt, rng-R.pt, trainer_state.json},
        written under a temporary name and renamed, so an interrupted save leaves no checkpoint-N."""
        acc = self.accelerator
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{self.state.step:07d}"
        temp = self.output_dir / f".{final.name}.tmp"
        acc.wait_for_everyone()
        if acc.is_main_process:
            check_no_symlink(final, self.output_dir)
            check_no_symlink(temp, self.output_dir)
            with _writing(temp):
                shutil.rmtree(temp, ignore_errors=True)
                temp.mkdir(parents=True)
        acc.wait_for_everyone()
        try:
            if acc.distributed_type == DistributedType.DEEPSPEED:  # ZeRO shards optimizer state across processes
                with _writing(temp / "accelerate"):
                    acc.save_state(str(temp / "accelerate"))
            _torch_save(_rng_state(), temp / f"rng-{acc.process_index}.pt")
            acc.wait_for_everyone()
            if acc.is_main_process:
                self._write_checkpoint_files(temp)
                with _writing(final):
                    replace_folder(temp, final)
                self._prune_checkpoints()
                logger.info("saved %s", final)
        finally:
            if acc.is_main_process:  # nothing half-written stays behind (a folder that was renamed is gone)
                shutil.rmtree(temp, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _write_checkpoint_files(self, folder: Path) -> None:
        models = self.models
        with _writing(folder / "model"):
            save_checkpoint(folder / "model", models.model_config, models.encoder, models.unet)
            self._store_negative(folder / "model")
        if self.accelerator.distributed_type != DistributedType.DEEPSPEED:
            _torch_save(self.optimizer.state_dict(), folder / "optimizer.pt")
        _torch_save(self.lr_scheduler.state_dict(), folder / "scheduler.pt")
        with _writing(folder / STATE_NAME):
            (folder / STATE_NAME).write_text(json.dumps({"state": asdict(self.state), "config": self.config.to_dict()}))

    def _store_negative(self, folder: Path) -> None:
        """The negative branch beside an inference checkpoint (`easyref.checkpoint.NegativeStore`), computed by
        the model being trained where that is what a pipeline loading the checkpoint computes: every weight in
        one dtype (mixed_precision "no"; bf16 mixed precision holds the frozen trunk in bf16 beside a float32
        aggregation layer, a mix no pipeline loads) and all of them in this process (not DeepSpeed or FSDP).
        Elsewhere the first generation computes it and stores it."""
        from ..checkpoint import store_negative
        from ..resolve import ResolveError, resolve

        encoder = self.models.encoder
        dtypes = {t.dtype for t in [*encoder.parameters(), *encoder.buffers()] if t.is_floating_point()}
        sharded = self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        if len(dtypes) != 1 or sharded:
            logger.debug("the negative branch is left to the first generation (dtypes %s)", sorted(map(str, dtypes)))
            return
        try:
            mllm = resolve(self.config.mllm, "mllm").path
        except ResolveError as err:
            logger.debug("the negative branch is left to the first generation: %s", err)
            return
        modes = {module: module.training for module in encoder.modules()}
        encoder.eval()
        try:
            store_negative(folder, encoder, mllm)
        except (RuntimeError, ValueError) as err:  # an optimisation: never the end of a run's checkpoint
            logger.warning("the negative branch was not stored with %s: %s", folder, err)
        finally:
            for module, training in modes.items():
                module.train(training)

    def _prune_checkpoints(self) -> None:
        keep = self.config.keep_checkpoints
        if keep == 0:
            return
        for old in list_checkpoints(self.output_dir)[:-keep]:
            check_no_symlink(old, self.output_dir)
            with _writing(old):
                shutil.rmtree(old)

    def _save_final(self) -> Path:
        acc = self.accelerator
        final = self.output_dir / FINAL_NAME
        here = self.output_dir / f"{CHECKPOINT_PREFIX}{self.state.step:07d}"
        if not (self._resumed_step == self.state.step and (here / "model" / WEIGHTS_NAME).is_file()):
            self.save_checkpoint()  # the full training state at the end too, so a run can be extended
        if acc.is_main_process:
            temp = self.output_dir / f".{FINAL_NAME}.tmp"
            check_no_symlink(final, self.output_dir)
            check_no_symlink(temp, self.output_dir)
            try:  # built beside it and renamed: a crash never leaves half a final/
                with _writing(final):
                    shutil.rmtree(temp, ignore_errors=True)
                    save_checkpoint(temp, self.models.model_config, self.models.encoder, self.models.unet)
                    self._store_negative(temp)
                    replace_folder(temp, final)
            finally:
                shutil.rmtree(temp, ignore_errors=True)
            logger.info("inference checkpoint: %s; try it with: %s", final, self.generate_command(final))
        acc.wait_for_everyone()
        return final

    def generate_command(self, final: Path) -> str:
        """The `easyref generate` command printed at the end of a run (`generate_command` below)."""
        return generate_command(final, self.config, self._example, bool(self.validation_references))

    def _load_model_state(self, point: ResumePoint) -> None:
        config, tensors = point.model
        apply_checkpoint(config, tensors, self.models.encoder, self.models.unet)
        point.model = None  # the tensors now live in the modules
        self.state = point.state
        self._resumed_step = point.state.step
        _warn_config_changes(point.saved_config, self.config)
        logger.info(
            "resuming from %s at step %d (epoch %d, batch %d)",
            point.folder,
            self.state.step,
            self.state.epoch,
            self.state.batch,
        )

    def _load_optimizer_state(self, point: ResumePoint) -> None:
        folder = point.folder
        try:
            if point.optimizer is None:  # DeepSpeed: its files were checked by read_resume_point
                self.accelerator.load_state(str(folder / "accelerate"))
            else:
                self.optimizer.load_state_dict(point.optimizer)
            if point.scheduler is not None:
                self.lr_scheduler.load_state_dict(point.scheduler)
            if point.rng is not None:
                _set_rng_state(point.rng)
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as err:
            raise CheckpointError(
                f"--resume {folder}: the saved optimizer, scheduler or generator state does not fit this run "
                f"({_one_line(err)})"
            ) from None
        point.optimizer = point.scheduler = point.rng = None

    # ------------------------------------------------------------------ validation
    def validate(self) -> Path | None:
        """Generate the fixed validation group and prompt; write a grid PNG under validation/."""
        from .validation import write_validation_grid

        if not self.accelerator.is_main_process:
            return None
        self.model.eval()
        try:
            with self.accelerator.autocast(), _writing(self.output_dir / VALIDATION_DIR):
                return write_validation_grid(
                    self.models, self.config, self.output_dir, self.state.step, references=self.validation_references
                )
        finally:
            self.model.train()


# ---------------------------------------------------------------------- helpers
def list_checkpoints(output_dir: Path) -> list[Path]:
    found = [
        p
        for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*")
        if p.name.removeprefix(CHECKPOINT_PREFIX).isdigit() and (p / "model" / WEIGHTS_NAME).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def resolve_resume(output_dir: Path, resume: str) -> Path:
    """`latest` = the newest complete checkpoint in the output folder; otherwise a checkpoint folder."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume latest: no checkpoint in {output_dir}")
        return found[-1]
    folder = Path(resume)
    if not (folder / STATE_NAME).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a training checkpoint (no {STATE_NAME})")
    return folder


# ---------------------------------------------------------------------- the output folder
@contextmanager
def _writing(path: Path):
    """A failed write (disk full, quota, permissions, I/O) -> OutputWriteError, one line naming `path`."""
    try:
        yield
    except OutputWriteError:
        raise
    except OSError as err:
        raise OutputWriteError(describe_os_error(err, err.filename or path)) from None
    except Exception as err:  # torch's and safetensors' writers report a full disk in their own words
        text = str(err)
        if is_disk_error(err) or "No space left" in text or "StorageFull" in text or "os error 28" in text:
            raise OutputWriteError(f"no space left on the device writing {path}") from None
        raise


def _torch_save(obj, path: Path) -> None:
    """torch.save for our own state files; a failure of torch's writer itself is a write error (exit 1)."""
    with _writing(path):
        try:
            torch.save(obj, path)
        except RuntimeError as err:  # PytorchStreamWriter: "file write failed", "unexpected pos", iostream errors
            if is_disk_error(err) or _nearly_full(path.parent):
                raise OutputWriteError(f"no space left on the device writing {path}") from None
            raise OutputWriteError(f"writing {path} failed ({_one_line(err)})") from None


def _nearly_full(folder: Path) -> bool:
    """torch reports a full disk as "unexpected pos N vs M" as often as anything else: ask the disk."""
    try:
        return shutil.disk_usage(folder).free < 16 * 2**20
    except OSError:
        return False


def check_output_dir(output_dir: Path) -> None:
    """Before anything is loaded: the output folder is a folder, and nothing the trainer writes in it
    (files, checkpoint folders, final/, validation/, logs) is a symlink or a file of the wrong kind."""
    if output_dir.is_symlink() and not output_dir.exists():
        raise ConfigError(f"output_dir {output_dir} is a symlink to nothing")
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise ConfigError(f"output_dir {output_dir} exists and is not a folder")
    files = [output_dir / CONFIG_FILE, output_dir / METRICS_FILE, output_dir / LOCK_NAME]
    folders = [output_dir / FINAL_NAME, output_dir / VALIDATION_DIR, output_dir / TRACKER_DIR]
    folders += sorted(output_dir.glob(f"{CHECKPOINT_PREFIX}*"))
    temps = sorted(output_dir.glob(f".{CHECKPOINT_PREFIX}*.tmp")) + sorted(output_dir.glob(f".{FINAL_NAME}*.tmp"))
    for path in files + folders + temps:
        check_no_symlink(path, output_dir)
    validation = output_dir / VALIDATION_DIR
    if validation.is_dir():
        for path in validation.iterdir():
            check_no_symlink(path, output_dir)
    for path in files:
        if path.exists() and not path.is_file():
            raise ConfigError(f"{path} is in the way: the trainer writes a file there, and it is not one (remove it)")
    for path in folders:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{path} is in the way: the trainer writes a folder there, and it is not one (remove it)")


def _check_init_from(config: TrainConfig, output_dir: Path) -> None:
    """The previous stage's checkpoint must not be one this run replaces (its final/ or a checkpoint-N)."""
    if not config.init_from:
        return
    source = Path(config.init_from).resolve()
    out = output_dir.resolve()
    for replaced in [out / FINAL_NAME, *out.glob(f"{CHECKPOINT_PREFIX}*")]:
        if source == replaced or replaced in source.parents:
            raise ConfigError(
                f"init_from {config.init_from} is inside output_dir {output_dir}, whose final/ and checkpoints "
                "this run replaces; choose another output_dir (--output-dir)"
            )


# ---------------------------------------------------------------------- reading a checkpoint to resume
def read_resume_point(output_dir: Path, resume: str, process_index: int) -> ResumePoint:
    """Read and check a whole training checkpoint before any model is loaded.

    Every pickle-based file in it must load with torch.load(weights_only=True) (accelerate's numpy
    allowance for its own files): one that does not (a planted object, a damaged file) is refused
    with one line, never skipped. Symlinks and non-regular files inside are refused too.
    DeepSpeed's own shard folder (accelerate/pytorch_model*) is read by DeepSpeed and not checked here.
    """
    folder = resolve_resume(output_dir, resume)
    where = f"--resume {folder}"
    loaded = _check_checkpoint_files(folder, where)
    try:
        saved = load_json(folder / STATE_NAME, "trainer state")
    except JSONFileError as err:
        raise CheckpointError(f"{where}: {err}") from None
    state, config = _parse_trainer_state(saved, f"{where}: {folder / STATE_NAME}")
    try:
        model = read_checkpoint(folder / "model")
    except CheckpointError as err:
        raise CheckpointError(f"{where}: {_one_line(err)}") from None
    except (ValueError, TypeError, OSError, RecursionError) as err:
        raise CheckpointError(f"{where}: cannot read {folder / 'model'} ({_one_line(err)})") from None
    deepspeed = (folder / "accelerate").is_dir()
    optimizer = None if deepspeed else loaded.get("optimizer.pt")
    if not deepspeed and optimizer is None:
        raise CheckpointError(f"{where}: optimizer.pt is missing")
    for name in ("optimizer.pt", "scheduler.pt"):
        if name in loaded and not isinstance(loaded[name], dict):
            raise CheckpointError(f"{where}: {name} does not hold a state dict")
    rng = loaded.get(f"rng-{process_index}.pt")
    if rng is not None and not (
        isinstance(rng, dict) and isinstance(rng.get("python"), tuple) and isinstance(rng.get("torch"), torch.Tensor)
    ):
        raise CheckpointError(f"{where}: rng-{process_index}.pt does not hold generator states")
    return ResumePoint(folder, state, config, model, optimizer, loaded.get("scheduler.pt"), rng)


def _check_checkpoint_files(folder: Path, where: str) -> dict:
    """Refuse symlinks, odd files and any pickle that weights_only loading refuses; return the
    top-level files' contents (optimizer.pt, scheduler.pt, rng-R.pt), so each is read once."""
    from accelerate.utils import load as accelerate_load

    loaded = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        here = Path(dirpath)
        relative = here.relative_to(folder).parts
        for name in sorted(dirnames + filenames):
            path = here / name
            if path.is_symlink():
                raise CheckpointError(f"{where}: {path} is a symlink; a checkpoint is read only from its own files")
            if name in filenames and not path.is_file():
                raise CheckpointError(f"{where}: {path} is not a regular file")
        deepspeed_shards = len(relative) >= 2 and relative[0] == "accelerate"
        for name in sorted(filenames):
            if not name.endswith(PICKLE_SUFFIXES) or deepspeed_shards:
                continue
            path = here / name
            try:
                if relative and relative[0] == "accelerate":
                    value = accelerate_load(path, map_location="cpu")
                else:
                    value = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:
                wanted = re.search(r"GLOBAL ([\w.]+)", str(err))
                if wanted:  # a pickle that imports something: what torch.load(weights_only=True) exists to stop
                    raise CheckpointError(
                        f"{where}: {path} holds objects other than tensors (it asks for {wanted.group(1)}), which "
                        "torch.load(weights_only=True) refuses; not loading it (this trainer never writes any)"
                    ) from None
                raise CheckpointError(f"{where}: {path} is damaged or not a torch file") from None
            except Exception as err:  # damaged zip archives, truncated files, ... raise many types
                raise CheckpointError(f"{where}: {path} is damaged or not a torch file ({_one_line(err)})") from None
            if not relative:
                loaded[name] = value
    return loaded


def _parse_trainer_state(saved, where: str) -> tuple[TrainState, dict]:
    fields = {f.name for f in dataclasses.fields(TrainState)}
    ok = isinstance(saved, dict) and isinstance(saved.get("state"), dict) and isinstance(saved.get("config"), dict)
    if ok:
        values = saved["state"]
        ok = set(values) <= fields and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values.values()
        )
    if not ok:
        raise CheckpointError(f"{where}: not a trainer state written by easyref train")
    return TrainState(**saved["state"]), saved["config"]


def skip_verdict(skipped: int, seen: int, epoch_size: int, fraction: float, window: int, finished: bool) -> str | None:
    """Why a run must stop for its skipped samples, or None.

    - at any time: more than `fraction` of the whole epoch is already skipped (so it cannot end below);
    - every one of the epoch's first `window` samples failed (or all seen so far, when the run ends);
    - when the run ends mid-epoch after at least `window` samples: more than `fraction` of those seen.
    `fraction` 1 never stops; 0 stops at the first skipped sample.
    """
    if skipped == 0 or fraction >= 1:
        return None
    if skipped > fraction * epoch_size:
        return f"more than max_skip_fraction {fraction:g} of the epoch's {epoch_size} samples"
    if skipped >= seen and (seen >= window or finished):
        return f"all of the first {seen} samples of the epoch failed"
    if finished and seen >= window and skipped > fraction * seen:
        return f"more than max_skip_fraction {fraction:g} of the {seen} samples seen"
    return None


def _one_line(value) -> str:
    lines = str(value).strip().splitlines()
    return " ".join(" ".join(lines[:1]).split()) or type(value).__name__


def _rng_state() -> dict:
    """The global generators. The loop draws nothing from them (all its randomness is keyed per
    sample), but a model with dropout would, so a resumed run restores them too."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_validation_references(config: TrainConfig):
    """Fail at start-up, not at the first validation hours later; the images are kept for every validation."""
    if not config.validation_every:
        return None
    from ..images import ImageFileError
    from .validation import load_validation_references

    try:
        return load_validation_references(config.validation_references)
    except ImageFileError as err:
        raise ConfigError(f"validation_references: {err}") from None


def generate_command(final: Path, config: TrainConfig, example: dict | None, validating: bool = False) -> str:
    """A command that runs as printed from the folder training ran in: the checkpoint alone names its base
    and MLLM, the references and prompt are the validation group's (`validating`) or the data's first record
    (`example`). A function of the config and data alone, so that tests/test_vocabulary.py can check its
    prompt without training."""
    if validating:
        references, prompt = [str(p) for p in config.validation_references], config.validation_prompt
    else:
        references, prompt = _example_group(example, Path(config.data_root))
    words = ["easyref", "generate", "--adapter", str(final)]
    for reference in references[:MAX_HINT_REFERENCES]:
        words += ["--ref", reference]
    return shlex.join(words + ["--prompt", prompt or "a photo", "--out", "generated.png"])


def _example_group(record: dict | None, root: Path) -> tuple[list[str], str]:
    """A record's references under the data root (its target when it has none: stages 1-2) and its caption."""
    if not isinstance(record, dict):
        return ["IMAGE.png"], "a photo"
    names = record.get("image_file") or record.get("target")
    names = [names] if isinstance(names, str) else list(names or [])
    texts = record.get("text")
    text = texts if isinstance(texts, str) else (texts or ["a photo"])[0]
    return [str(root / name) for name in names if isinstance(name, str)] or ["IMAGE.png"], str(text)


def _warn_config_changes(saved: dict, config: TrainConfig) -> None:
    changed = sorted(
        k for k, v in config.to_dict().items() if saved.get(k) != v and k not in ("max_steps", "output_dir")
    )
    if changed:
        logger.warning(
            "resuming with changed settings (the run will not repeat the original exactly): %s", ", ".join(changed)
        )


def _encode_latents(vae, pixels: torch.Tensor, generators) -> torch.Tensor:
    """fp32 VAE encode; the posterior sample draws from each sample's own generator."""
    posterior = vae.encode(pixels.float()).latent_dist
    eps = torch.stack([torch.randn(posterior.mean.shape[1:], generator=g) for g in generators]).to(pixels.device)
    latents = posterior.mean + posterior.std * eps
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def _zero_loss(trainables) -> torch.Tensor:
    """A batch whose every image was unreadable still joins the gradient all-reduce, with zero effect."""
    return sum(p.sum() for _, p in trainables) * 0.0


def _trackers(config: TrainConfig):
    if not config.tensorboard:
        return None
    from accelerate.utils import is_tensorboard_available

    return "tensorboard" if is_tensorboard_available() else None


def _flat_config(config: TrainConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))}


def _peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


@contextmanager
def _closing(progress):
    try:
        yield progress
    finally:
        progress.close()


def _progress(total: int, done: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


class _Meter:
    """Loss, throughput and data-wait share since the last log line."""

    def __init__(self):
        self._reset()

    def _reset(self):
        self.losses, self.samples, self.data_time, self.started = [], 0, 0.0, time.perf_counter()

    def add(self, loss: float, samples: int) -> None:
        self.losses.append(loss)
        self.samples += samples

    def add_data_time(self, seconds: float) -> None:
        self.data_time += seconds

    def flush(self, accelerator) -> dict:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        out = {
            # None when every sample since the last line was skipped: nothing was trained, no loss to show
            "loss": sum(self.losses) / len(self.losses) if self.losses else None,
            "samples_per_s": self.samples * accelerator.num_processes / elapsed,
            "data_time_share": self.data_time / elapsed,
        }
        if out["loss"] is not None and not math.isfinite(out["loss"]):
            logger.warning("loss is %s", out["loss"])
        self._reset()
        return out
