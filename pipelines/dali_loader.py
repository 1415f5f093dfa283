"""The DALI backend: JPEG decoding and both views' crops in a DALI pipeline, on the GPU where there is one.

Data flow per batch:
1. An external source (pipelines/sampler.py's order, pipelines/shard_index.py's indexed reads) hands DALI
   each sample's JPEG bytes plus its crop geometry, drawn by pipelines/geometry.py from (seed, epoch, global
   index) exactly as the reference backend draws it. Running in DALI's Python worker processes
   (parallel=True, batch_info=True), it is a pure function of (epoch, step): DALI's epoch counter k maps to
   the loader's epoch first_epoch + k, so the pipeline needs no message from the training loop between epochs.
2. DALI decodes each JPEG once (`decoders.image`, device "mixed" = nvJPEG / hardware decoder, or "cpu" =
   libjpeg-turbo), resizes the two crop boxes with antialiased bilinear filters (`resize` with a per-sample
   ROI, the image view then flipped), and cuts the nine patches of It in one `multi_paste` into a (9*T, T)
   canvas that a reshape turns into (9, T, T, 3).
3. Outputs stay on DALI's device (the training GPU): the loop's .to(device) is then a no-op. index, label and
   the geometry keys stay on the host, as the batched stage's draws want them.

One pipeline definition for both devices: the decoder's device string (and the decoder arguments only the
GPU decoder has) is the only difference. The batched stage (pipelines/augment.py) does the photometric work
afterwards, as for every backend, so pixels differ from the reference only by resampling arithmetic.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from pirl_trainer.pipelines import batch as B
from pirl_trainer.pipelines.dali_options import DaliOptions
from pirl_trainer.pipelines.epoch_loader import CorruptSamples, EpochLoader
from pirl_trainer.pipelines.errors import DALI_INSTALL_HINT, BackendUnavailable
from pirl_trainer.pipelines.geometry import draw_sample_geometry
from pirl_trainer.pipelines.jpeg_check import jpeg_problem
from pirl_trainer.pipelines.loader_front import open_loader
from pirl_trainer.pipelines.recipe import PirlRecipe
from pirl_trainer.common.rng import PURPOSE_SAMPLE, generator_for
from pirl_trainer.pipelines.sampler import epoch_batches
from pirl_trainer.pipelines.shard_index import SampleTable, ShardReader
from pirl_trainer.pipelines.views import eval_size, jpeg_header

# DALI's decoder names the failing row of the batch it was handed (the corrupt samples already left out).
DECODE_FAILURE = re.compile(r"Failed to decode sample #(\d+)")


def sent_size(jpg: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG the source hands DALI, None for one it leaves out as corrupt. DALI's decoder would
    stop the pipeline on some corrupt JPEGs and silently decode others (a lost tail), so a sample that fails the
    structure check or whose header libjpeg-turbo cannot read is left out, and its batch is one shorter
    (EpochLoader counts it)."""
    if jpeg_problem(jpg) is not None:
        return None
    try:
        height, width, _ = jpeg_header(jpg)
    except ValueError:
        return None
    return height, width


def _import_dali():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as err:
        raise BackendUnavailable(
            f"data.backend=dali needs NVIDIA DALI, not installed here: {DALI_INSTALL_HINT}") from err
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import Pipeline
    from nvidia.dali.backend import TensorListGPU
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
    return fn, types, Pipeline, feed_ndarray, to_torch_type, TensorListGPU

def resolve_decode_device(requested: str) -> str:
    """"cpu" or "mixed" for data.dali.decode_device; "mixed" without a usable GPU is an error that says why."""
    if requested == "auto":
        return "mixed" if torch.cuda.is_available() else "cpu"
    if requested == "mixed" and not torch.cuda.is_available():
        raise BackendUnavailable(
            "data.dali.decode_device=mixed decodes on a GPU, but torch sees no CUDA device here: "
            "use data.dali.decode_device=cpu (or auto) on this machine"
        )
    return requested

# --- 1. the external source: bytes + geometry of one batch, a pure function of (epoch, step) ---------------

def pretrain_outputs(recipe: PirlRecipe, labelled: bool, with_geometry: bool) -> list[str]:
    """Names of the source's outputs, in order; the pipeline graph and the source agree through this list."""
    names = ["jpg", "image_start", "image_end", "image_flip", "jigsaw_start", "jigsaw_end"]
    names += ["jigsaw_flip"] if recipe.second_image_view else ["paste_ids", "paste_anchors"]
    names += [B.INDEX] + ([B.LABEL] if labelled else [])
    return names + (list(B.GEOMETRY_KEYS) if with_geometry else [])

def eval_outputs(labelled: bool) -> list[str]:
    return ["jpg", "resize_to", "crop_start", B.INDEX] + ([B.LABEL] if labelled else [])

class SampleSource:
    """DALI's external-source callback. Picklable; opens its own shard descriptors in each worker process."""

    def __init__(self, table: SampleTable, recipe: PirlRecipe, *, batch_size: int, rank: int, world_size: int,
                 seed: int, mode: str, with_geometry: bool, first_epoch: int, first_step: int):
        self.reader = ShardReader(table)
        self.recipe = recipe
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.mode, self.with_geometry = seed, mode, with_geometry
        self.first_epoch, self.first_step = first_epoch, first_step
        self.names = (pretrain_outputs(recipe, table.labelled, with_geometry) if mode == "pretrain"
                      else eval_outputs(table.labelled))
        self._plan: tuple[int, list[np.ndarray]] | None = None  # (epoch, its batches): one permutation an epoch

    def epoch_plan(self, dali_epoch: int) -> tuple[int, list[np.ndarray]]:
        epoch = self.first_epoch + dali_epoch
        if self._plan is None or self._plan[0] != epoch:
            batches = epoch_batches(
                self.reader.table.num_samples, self.batch_size, rank=self.rank, world_size=self.world_size,
                seed=self.seed, epoch=epoch, shuffle=self.mode == "pretrain",
                start_step=self.first_step if dali_epoch == 0 else 0,
            )
            self._plan = (epoch, batches)
        return self._plan

    def __call__(self, info) -> tuple[list[np.ndarray], ...]:
        epoch, batches = self.epoch_plan(info.epoch_idx)
        if info.iteration >= len(batches):
            raise StopIteration
        rows = []
        for i in batches[info.iteration]:
            raw = self.reader.read(int(i))
            size = sent_size(raw.jpg)
            if size is not None:
                rows.append(self.sample(epoch, raw, size, position=len(rows)))
        if not rows:
            step = info.iteration + (self.first_step if info.epoch_idx == 0 else 0)
            raise RuntimeError(f"step {step} of epoch {epoch} on rank {self.rank}: every sample is corrupt")
        return tuple([row[name] for row in rows] for name in self.names)

    def sent_rows(self, indexes: np.ndarray) -> list[int]:
        """The samples of a batch that __call__ hands DALI, in order: those not left out as corrupt."""
        return [int(i) for i in indexes.tolist() if sent_size(self.reader.read(int(i)).jpg) is not None]

    def sample(self, epoch: int, raw, size: tuple[int, int], position: int) -> dict[str, np.ndarray]:
        """One sample's outputs, its JPEG (height, width) given; `position` is its row in the batch DALI receives."""
        height, width = size
        out = {"jpg": np.frombuffer(raw.jpg, dtype=np.uint8), B.INDEX: np.array(raw.index, dtype=np.int64)}
        if raw.label is not None:
            out[B.LABEL] = np.array(raw.label, dtype=np.int64)
        i = raw.index
        if self.mode == "eval":
            out.update(self._eval_geometry(height, width))
        else:
            out.update(self._pretrain_geometry(height, width, epoch, i, position))
        return out

    def _eval_geometry(self, height: int, width: int) -> dict[str, np.ndarray]:
        # torchvision's resize([eval size]) then center_crop: the reference's eval_view, step by step.
        h, w = eval_size(height, width, self.recipe)
        s = self.recipe.image_size
        top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        return {"resize_to": np.array([h, w], dtype=np.float32), "crop_start": np.array([top, left], dtype=np.int32)}

    def _pretrain_geometry(self, height: int, width: int, epoch: int, i: int, position: int) -> dict:
        geo = draw_sample_geometry(height, width, self.recipe, generator_for(PURPOSE_SAMPLE, self.seed, epoch, i))
        out = {}
        for name, (top, left, h, w) in (("image", geo.image_box), ("jigsaw", geo.jigsaw_box)):
            out[f"{name}_start"] = np.array([top, left], dtype=np.float32)
            out[f"{name}_end"] = np.array([top + h, left + w], dtype=np.float32)
        out["image_flip"] = np.array(int(geo.image_flipped), dtype=np.int32)
        out["jigsaw_flip"] = np.array(int(geo.jigsaw_flipped), dtype=np.int32)
        origins = geo.patch_origins.numpy()
        out["paste_ids"] = np.full(len(origins), position, dtype=np.int32)  # every patch from this sample's crop
        out["paste_anchors"] = origins.astype(np.int32)
        if self.with_geometry:
            out[B.PATCH_ORIGIN] = origins.astype(np.int64)
            out[B.JIGSAW_BOX] = np.array(geo.jigsaw_box, dtype=np.int64)
            out[B.IMAGE_BOX] = np.array(geo.image_box, dtype=np.int64)
            out[B.IMAGE_FLIPPED] = np.array(geo.image_flipped)
            out[B.JIGSAW_FLIPPED] = np.array(geo.jigsaw_flipped)
        return out

# --- 2. the pipeline graph ----------------------------------------------------------------------------------

def _graph(fn, types, source: SampleSource, recipe: PirlRecipe, device: str, options: DaliOptions,
           parallel: bool) -> dict:
    """Build the DALI graph inside a `with pipe:` block; returns {output key: DataNode}."""
    names = source.names
    nodes = dict(zip(names, fn.external_source(
        source=source, num_outputs=len(names), batch=True, batch_info=True, parallel=parallel,
        prefetch_queue_depth=options.prefetch_queue_depth if parallel else None,
    )))
    decoder_args = {}
    if device == "mixed":  # arguments only the GPU decoder has
        decoder_args = dict(hw_decoder_load=options.hw_decoder_load,
                            device_memory_padding=options.device_memory_padding,
                            host_memory_padding=options.host_memory_padding)
    # adjust_orientation=False: tools/make_shards.py bakes EXIF orientation into the pixels, and the geometry
    # was drawn from the header's (unrotated) size. Fancy upsampling: libjpeg-turbo's default, the reference's.
    images = fn.decoders.image(nodes["jpg"], device=device, output_type=types.RGB, adjust_orientation=False,
                               jpeg_fancy_upsampling=True, **decoder_args)
    out = {k: nodes[k] for k in names if k == B.INDEX or k == B.LABEL or k in B.GEOMETRY_KEYS}
    linear = dict(antialias=True, interp_type=types.INTERP_LINEAR, roi_relative=False, dtype=types.UINT8)
    if source.mode == "eval":
        s = recipe.image_size
        resized = fn.resize(images, size=nodes["resize_to"], antialias=True, interp_type=types.INTERP_LINEAR,
                            dtype=types.UINT8)
        out[B.IMAGE] = fn.slice(resized, nodes["crop_start"], np.array([s, s], dtype=np.int32), axes=[0, 1])
        return out
    s = recipe.image_size
    view = fn.resize(images, roi_start=nodes["image_start"], roi_end=nodes["image_end"], size=[s, s], **linear)
    out[B.IMAGE] = fn.flip(view, horizontal=nodes["image_flip"])
    if recipe.second_image_view:
        second = fn.resize(images, roi_start=nodes["jigsaw_start"], roi_end=nodes["jigsaw_end"], size=[s, s],
                           **linear)
        second = fn.flip(second, horizontal=nodes["jigsaw_flip"])
        out[B.PATCHES] = fn.reshape(second, shape=[1, s, s, 3], layout="FHWC")
        return out
    j, t, k = recipe.jigsaw_size, recipe.patch_size, recipe.view_tiles
    crop = fn.resize(images, roi_start=nodes["jigsaw_start"], roi_end=nodes["jigsaw_end"], size=[j, j], **linear)
    # Nine windows at nine offsets in one op: stacked into a (K*T, T) canvas, then viewed as K frames.
    canvas = fn.multi_paste(crop, in_ids=nodes["paste_ids"], in_anchors=nodes["paste_anchors"],
                            shapes=np.full((k, 2), t, dtype=np.int32),
                            out_anchors=np.array([[t * q, 0] for q in range(k)], dtype=np.int32),
                            output_size=[k * t, t])
    out[B.PATCHES] = fn.reshape(canvas, shape=[k, t, t, 3], layout="FHWC")
    return out

# --- 3. the loader ------------------------------------------------------------------------------------------

class DaliLoader(EpochLoader):
    """One rank's DALI loader. A pipeline is built for a (epoch, start step) and reused for the epochs after
    it; any other set_epoch (a resume, an epoch abandoned half-way) builds a fresh one."""

    selectable = False  # its SampleSource plans every epoch from the sampler (epoch_plan)

    def __init__(self, table: SampleTable, recipe: PirlRecipe, *, options: DaliOptions, **kwargs):
        self._pipe = None
        self._source: SampleSource | None = None
        super().__init__(table, recipe, **kwargs)
        self.options = options
        self.device = resolve_decode_device(options.decode_device)
        self._dali = _import_dali()
        self._names: list[str] = []
        self._next: tuple[int, int] | None = None  # the (epoch, start step) the live pipeline produces next

    def _build(self) -> None:
        fn, types, Pipeline = self._dali[:3]
        self.close()
        source = SampleSource(self.table, self.recipe, batch_size=self.batch_size, rank=self.rank,
                              world_size=self.world_size, seed=self.seed, mode=self.mode,
                              with_geometry=self.with_geometry, first_epoch=self.epoch, first_step=self.start_step)
        self._source = source
        parallel = self.num_workers > 0
        device_id = torch.cuda.current_device() if self.device == "mixed" else None
        pipe = Pipeline(
            batch_size=self.max_batch_size, num_threads=self.options.num_threads or max(1, self.num_workers),
            device_id=device_id, seed=self.seed, prefetch_queue_depth=self.options.queue_depths(),
            py_num_workers=max(1, self.num_workers),
            # Forked workers must not inherit an initialised CUDA context; spawn re-imports instead (slower).
            py_start_method="spawn" if torch.cuda.is_initialized() else "fork",
        )
        with pipe:
            nodes = _graph(fn, types, source, self.recipe, self.device, self.options, parallel)
            self._names = list(nodes)
            pipe.set_outputs(*nodes.values())
        pipe.build()
        self._pipe = pipe

    def _iterate(self, batches):
        if self._pipe is None or self._next != (self.epoch, self.start_step):
            self._build()
        self._next = None  # until this epoch is read to its end
        epoch, steps = self.epoch, len(self) - self.start_step
        for step in range(steps):
            yield self._to_batch(self._run(batches[step]))
        try:
            self._pipe.run()
        except StopIteration:
            self._pipe.reset()
        else:
            raise RuntimeError(f"DALI pipeline produced more than the {steps} steps of epoch {epoch}")
        self._next = (epoch + 1, 0)

    def _run(self, want: np.ndarray):
        """The next batch's outputs; a JPEG whose headers are sound but whose coded data DALI cannot decode stops
        the epoch (DALI cannot leave a sample out once it decodes), with an error naming the sample."""
        try:
            return self._pipe.run()
        except RuntimeError as err:
            failed = DECODE_FAILURE.search(str(err))
            sent = self._source.sent_rows(want) if failed else []
            if not failed or int(failed.group(1)) >= len(sent):
                raise
            i = sent[int(failed.group(1))]
            raise CorruptSamples(
                f"{self.sample_location(i)}: its JPEG could not be decoded (DALI: {failed.group(0)} of the batch; the "
                "decoder's own message is above): DALI stops at such a sample, where the reference and FFCV backends "
                "leave it out; remake the shards (tools/make_shards.py decodes every image) or train with "
                "data.backend=reference"
            ) from err

    def _to_batch(self, outputs) -> B.Batch:
        batch = {name: self._to_torch(out) for name, out in zip(self._names, outputs)}
        batch[B.IMAGE] = batch[B.IMAGE].permute(0, 3, 1, 2)  # NHWC storage, NCHW shape: a channels-last view
        if B.PATCHES in batch:
            batch[B.PATCHES] = batch[B.PATCHES].permute(0, 1, 4, 2, 3)
        return batch

    def _to_torch(self, tensor_list) -> torch.Tensor:
        """A DALI output batch -> a torch tensor on the same device (DALI reuses its buffers: this copies)."""
        feed_ndarray, to_torch_type, tensor_list_gpu = self._dali[3:]
        dense = tensor_list.as_tensor()
        on_gpu = isinstance(tensor_list, tensor_list_gpu)
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device) if on_gpu else None)
        return out

    def close(self) -> None:
        """Stop the pipeline and its Python workers."""
        if self._pipe is not None:
            del self._pipe
            self._pipe = None
        self._next = None

    def __del__(self):
        self.close()

def make_loader(shard_dir: str, recipe: PirlRecipe, **kwargs) -> DaliLoader:
    """DALI-backend loader over the shards of tools/make_shards.py (same arguments as the reference's).

    kwargs: the arguments of every backend (pipelines/loader_front.py LoaderArgs) and this backend's own
    (_own_options): options=DaliOptions(...) or its dict (data.dali), and pin_memory, accepted for interface
    parity (DALI manages its own pinned buffers). num_workers: DALI's Python workers reading bytes and drawing
    geometry (0 = in the main thread) and, unless options.num_threads says otherwise, its CPU threads decoding and
    resizing.
    """
    return open_loader("dali", shard_dir, recipe, kwargs, options=_own_options, loader=DaliLoader)


def _own_options(*, options: DaliOptions | dict | None = None, pin_memory: bool | None = None) -> dict:
    """The DALI backend's own make_loader options, checked, as DaliLoader's keyword arguments (pin_memory dropped)."""
    options = DaliOptions(**options) if isinstance(options, dict) else (options or DaliOptions())
    options.validate()
    return {"options": options}

__all__ = ["DaliLoader", "DaliOptions", "SampleSource", "make_loader", "resolve_decode_device"]
