"""Settings of the DALI backend (data.dali in the training config). Importing this module does not import DALI.

Defaults and what to try first when the loader is the bottleneck: docs/pipelines.md, "The DALI backend".
"""

from dataclasses import dataclass

DECODE_DEVICES = ("auto", "cpu", "mixed")
MIB = 1 << 20


@dataclass
class DaliOptions:
    # "mixed": nvJPEG (+ the hardware JPEG decoder where the GPU has one) and GPU resizes, outputs stay on the
    # GPU; "cpu": libjpeg-turbo and CPU resizes (device_id=None); "auto": mixed where CUDA is available.
    decode_device: str = "auto"
    num_threads: int = 0  # DALI's CPU worker threads; 0 = the loader's num_workers (at least 1)
    prefetch_queue_depth: int = 2  # batches DALI runs ahead of the training step (DALI's default)
    # >0: a separate queue for the CPU stage (reading, CPU decoding) of this depth, the GPU stage keeping
    # prefetch_queue_depth; 0: one queue for both (DALI's default)
    cpu_queue_depth: int = 0
    # Share of the JPEGs sent to the hardware decoder (A100/H100); the rest go nvJPEG's hybrid path. DALI's
    # default; lower it when the CPU threads sit idle while the decoder is busy.
    hw_decoder_load: float = 0.65
    # Extra room nvJPEG keeps on its device/pinned buffers so that a larger image does not reallocate mid-run
    # (a reallocation synchronises the device). DALI's defaults.
    device_memory_padding: int = 16 * MIB
    host_memory_padding: int = 8 * MIB

    def queue_depths(self) -> int | dict:
        """Pipeline(prefetch_queue_depth=...): an int, or the separated {cpu_size, gpu_size} form."""
        if self.cpu_queue_depth:
            return {"cpu_size": self.cpu_queue_depth, "gpu_size": self.prefetch_queue_depth}
        return self.prefetch_queue_depth

    def validate(self) -> None:
        if self.decode_device not in DECODE_DEVICES:
            raise ValueError(f"dali.decode_device must be one of {DECODE_DEVICES}, got {self.decode_device!r}")
        if self.num_threads < 0:
            raise ValueError(f"dali.num_threads must be >= 0, got {self.num_threads}")
        if self.prefetch_queue_depth < 1:
            raise ValueError(f"dali.prefetch_queue_depth must be >= 1, got {self.prefetch_queue_depth}")
        if self.cpu_queue_depth < 0:
            raise ValueError(f"dali.cpu_queue_depth must be >= 0, got {self.cpu_queue_depth}")
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise ValueError(f"dali.hw_decoder_load must be in [0, 1], got {self.hw_decoder_load}")
        for key in ("device_memory_padding", "host_memory_padding"):
            if getattr(self, key) < 0:
                raise ValueError(f"dali.{key} must be >= 0, got {getattr(self, key)}")
