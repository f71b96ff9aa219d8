"""Turning batches of uint8 RGB patches into backbone features, on the backbone's device.

Preprocessing runs on the device, after one uint8 copy: to float, resize to the backbone's input
size (only when the patch size differs; antialiased when shrinking), scale to [0, 1], normalise
with the backbone's mean/std, NCHW in ``channels_last`` memory format when configured. There is
no centre crop: a patch is the whole field of view. On CUDA the host batch is staged in pinned
memory and copied with ``non_blocking=True``; the model runs under ``torch.inference_mode()`` and
autocast (bf16 by default on CUDA, plain fp32 on the CPU). The code path is the same on both.

On the CPU the process's glibc allocator is tuned once (:func:`tune_cpu_allocator`, ADR 0004):
activations of a batch are 10-100 MB, and glibc's defaults, or the ``MALLOC_TRIM_THRESHOLD_``
a Dask nanny sets, would map and unmap them afresh on every forward pass.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import warnings

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from .backbones import Backbone, BackboneSpec

log = logging.getLogger(__name__)

#: glibc ``mallopt`` parameters (malloc.h) and the values set on CPU inference processes: blocks
#: under 256 MiB come from the heap, and up to 512 MiB of freed heap stays mapped for reuse.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
CPU_MMAP_THRESHOLD = 256 * 2**20
CPU_TRIM_THRESHOLD = 512 * 2**20


class GpuDecodeError(RuntimeError):
    """JPEG decoding on the GPU is not possible here; the message says why."""


def to_model_input(patches: torch.Tensor, spec: BackboneSpec,
                   channels_last: bool = True) -> torch.Tensor:
    """(B, H, W, 3) uint8 on any device → (B, 3, S, S) float32 normalised model input there."""
    if patches.ndim != 4 or patches.shape[-1] != 3 or patches.dtype != torch.uint8:
        raise ValueError(f"expected (B, H, W, 3) uint8 patches, got {tuple(patches.shape)} "
                         f"{patches.dtype}")
    x = patches.permute(0, 3, 1, 2).float()
    size = spec.input_size
    if x.shape[-2:] != (size, size):
        shrinking = x.shape[-2] > size or x.shape[-1] > size
        x = F.interpolate(x, size=(size, size), mode=spec.interpolation, align_corners=False,
                          antialias=shrinking).clamp_(0.0, 255.0)
    mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
    scale = 1.0 / (255.0 * torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1))
    x = (x - 255.0 * mean) * scale
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=memory_format)


@functools.cache
def tune_cpu_allocator() -> bool:
    """Keep large freed blocks on glibc's heap in this process, so CPU inference reuses its
    activation memory instead of page-faulting fresh mappings for every batch (1.25-1.4x faster
    with 2 threads; peak RSS about 0.4 GiB higher). Done at run time with ``mallopt``, so it works
    in Dask workers whatever environment their nanny gave them. Returns whether it applied (only
    with glibc); idempotent."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    applied = (mallopt(_M_MMAP_THRESHOLD, CPU_MMAP_THRESHOLD) == 1
               and mallopt(_M_TRIM_THRESHOLD, CPU_TRIM_THRESHOLD) == 1)
    log.debug("glibc allocator tuned for CPU inference: %s", applied)
    return applied


class Embedder:
    """Features of patch batches with one backbone: ``embedder(patches) -> (B, D) float32``.

    Batches larger than the backbone's ``batch_size`` are split; results do not depend on how a
    set of patches is batched (up to floating-point reassociation).
    """

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self._pinned: torch.Tensor | None = None
        if backbone.device.type == "cpu":
            tune_cpu_allocator()

    @property
    def feature_dim(self) -> int:
        """Length of one feature vector."""
        return self.backbone.spec.feature_dim

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 patches → (B, D) float32 features."""
        if patches.ndim != 4 or patches.shape[-1] != 3 or patches.dtype != np.uint8:
            raise ValueError(f"expected (B, H, W, 3) uint8 patches, got {patches.shape} "
                             f"{patches.dtype}")
        step = self.backbone.batch_size
        chunks = [self._embed(self._to_device(patches[start:start + step]))
                  for start in range(0, len(patches), step)]
        if not chunks:
            return np.empty((0, self.feature_dim), dtype=np.float32)
        return np.concatenate(chunks)

    def embed_tensor(self, patches: torch.Tensor) -> np.ndarray:
        """Features of a (B, H, W, 3) uint8 tensor already on the device (e.g. decoded there by
        :func:`decode_jpeg_batch_on_gpu`), in ``batch_size`` chunks."""
        step = self.backbone.batch_size
        chunks = [self._embed(patches[start:start + step].to(self.backbone.device))
                  for start in range(0, len(patches), step)]
        if not chunks:
            return np.empty((0, self.feature_dim), dtype=np.float32)
        return np.concatenate(chunks)

    def _to_device(self, chunk: np.ndarray) -> torch.Tensor:
        with warnings.catch_warnings():  # read-only arrays are fine: the batch is only read
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            host = torch.from_numpy(np.ascontiguousarray(chunk))
        device = self.backbone.device
        if device.type != "cuda":
            return host.to(device)
        # One reusable pinned staging buffer: the previous chunk's copy has finished because its
        # features were copied back to the host (a synchronising transfer) before this call.
        if self._pinned is None or self._pinned.numel() < host.numel():
            self._pinned = torch.empty(host.numel(), dtype=torch.uint8, pin_memory=True)
        staged = self._pinned[:host.numel()].view(host.shape)
        staged.copy_(host)
        return staged.to(device, non_blocking=True)

    def _embed(self, patches: torch.Tensor) -> np.ndarray:
        backbone = self.backbone
        dtype = backbone.autocast_dtype
        with torch.inference_mode(), torch.autocast(device_type=backbone.device.type,
                                                    dtype=dtype or torch.float32,
                                                    enabled=dtype is not None):
            x = to_model_input(patches, backbone.spec, backbone.config.channels_last)
            features = backbone.model(x)
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise RuntimeError(f"{backbone.spec.name} returned {tuple(features.shape)}, expected "
                               f"(B, {self.feature_dim})")
        return features.float().cpu().numpy()


def decode_jpeg_batch_on_gpu(jpeg_bytes: list[bytes], device: torch.device | str = "cuda"
                             ) -> torch.Tensor:
    """Decode same-sized JPEG patches with nvJPEG straight into GPU memory.

    Uses ``torchvision.io.decode_jpeg(..., device="cuda")`` in one batched call, so the pixels
    never pass through host memory after the compressed bytes; returns a (B, H, W, 3) uint8 tensor
    on ``device`` for :meth:`Embedder.embed_tensor`. Raises :class:`GpuDecodeError` when the device
    is not a CUDA device, CUDA is unavailable, or the patches differ in size.
    """
    target = torch.device(device)
    if target.type != "cuda":
        raise GpuDecodeError(f"GPU JPEG decoding needs a CUDA device, got {target}; decode on "
                             "the CPU (the slide reader) instead")
    if not torch.cuda.is_available():
        raise GpuDecodeError("GPU JPEG decoding needs CUDA, which is not available here; decode "
                             "on the CPU (the slide reader) instead")
    if not jpeg_bytes:
        raise ValueError("no JPEG data to decode")
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpeg_bytes]
    images = torchvision.io.decode_jpeg(encoded, mode=torchvision.io.ImageReadMode.RGB,
                                        device=target)
    sizes = {tuple(image.shape) for image in images}
    if len(sizes) != 1:
        raise GpuDecodeError(f"JPEG patches differ in size ({sorted(sizes)}); decode them in "
                             "same-sized batches")
    return torch.stack(images).permute(0, 2, 3, 1)
