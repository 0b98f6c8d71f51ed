"""Fashion-MNIST tasks: the IDX reader, splits, normalisation, models, hooks, tiny real runs."""

from __future__ import annotations

import gzip
import math
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

import rdrop
from rdrop._dropout import active_dropout_modules
from rdrop_lab.config import RunConfig
from rdrop_lab.runner import train_run
from rdrop_lab.store import ResultStore
from rdrop_lab.tasks import DataError, Example, TaskData, get_task
from rdrop_lab.tasks.images import (
    ENV_VAR,
    FILES,
    IMAGE_MAGIC,
    LABEL_MAGIC,
    FashionMNISTCNN,
    FashionMNISTViT,
    ImageCollator,
    SmallCNN,
    VisionTransformer,
    find_fashion_mnist,
    image_ref,
    read_idx,
    read_images_and_labels,
)

REAL = find_fashion_mnist(None)
HAVE_REAL = all((REAL / f"{stem}.gz").is_file() for pair in FILES.values() for stem in pair)
needs_real = pytest.mark.skipif(
    not HAVE_REAL,
    reason=f"Fashion-MNIST files not in {REAL}: apt-get install dataset-fashion-mnist "
    f"(or set ${ENV_VAR})",
)


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests pass their folders as ``data_dir`` (``REAL`` already honours the variable)."""
    monkeypatch.delenv(ENV_VAR, raising=False)


def _idx_bytes(magic: int, dims: tuple[int, ...], values: bytes) -> bytes:
    return struct.pack(f">I{len(dims)}I", magic, *dims) + values


def _write(path: Path, blob: bytes) -> Path:
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(blob)
    else:
        path.write_bytes(blob)
    return path


def _write_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    image_stem, label_stem = FILES[split]
    _write(folder / f"{image_stem}.gz", _idx_bytes(IMAGE_MAGIC, images.shape, images.tobytes()))
    _write(folder / f"{label_stem}.gz", _idx_bytes(LABEL_MAGIC, labels.shape, labels.tobytes()))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Fashion-MNIST-shaped folder: 300 training and 50 test images of random pixels."""
    folder = tmp_path_factory.mktemp("data") / "fashion-mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 300), ("t10k", 50)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        _write_split(folder, split, images, (np.arange(n) % 10).astype(np.uint8))
    return folder


def _tiny_task() -> FashionMNISTCNN:
    return FashionMNISTCNN(channels=(4, 8), hidden=16, validation_images=40)


# -- the IDX reader -------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_reads_images_and_labels(tmp_path: Path, suffix: str) -> None:
    pixels = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28).astype(np.uint8)
    images = _write(
        tmp_path / f"img{suffix}", _idx_bytes(IMAGE_MAGIC, (3, 28, 28), pixels.tobytes())
    )
    labels = _write(tmp_path / f"lab{suffix}", _idx_bytes(LABEL_MAGIC, (3,), bytes([9, 0, 4])))
    assert read_idx(images, IMAGE_MAGIC).shape == (3, 28, 28)
    x, y = read_images_and_labels(images, labels)
    assert x.dtype == torch.uint8 and x.shape == (3, 28, 28)
    assert torch.equal(x, torch.from_numpy(pixels))
    assert y.dtype == torch.int64 and y.tolist() == [9, 0, 4]


def _good_labels(tmp_path: Path, n: int = 2) -> Path:
    return _write(tmp_path / "labels.gz", _idx_bytes(LABEL_MAGIC, (n,), bytes(range(n))))


def _good_images(tmp_path: Path, n: int = 2) -> Path:
    return _write(tmp_path / "images.gz", _idx_bytes(IMAGE_MAGIC, (n, 28, 28), bytes(n * 28 * 28)))


CORRUPT = {
    "wrong magic": (_idx_bytes(LABEL_MAGIC, (2, 28, 28), bytes(2 * 784)), "magic number"),
    "truncated payload": (_idx_bytes(IMAGE_MAGIC, (2, 28, 28), bytes(784 + 5)), "truncated"),
    "trailing bytes": (_idx_bytes(IMAGE_MAGIC, (2, 28, 28), bytes(2 * 784 + 1)), "trailing"),
    "short header": (struct.pack(">II", IMAGE_MAGIC, 2), "header cut short"),
    "empty": (b"", "too short"),
    "not 28 x 28": (_idx_bytes(IMAGE_MAGIC, (2, 28, 27), bytes(2 * 28 * 27)), "28 x 27"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_image_file_is_a_data_error_naming_it(tmp_path: Path, case: str) -> None:
    blob, message = CORRUPT[case]
    images = _write(tmp_path / "bad-images.gz", blob)
    with pytest.raises(DataError, match=message) as error:
        read_images_and_labels(images, _good_labels(tmp_path))
    assert str(images) in str(error.value)


def test_missing_file_says_how_to_install(tmp_path: Path) -> None:
    missing = tmp_path / "train-images-idx3-ubyte.gz"
    with pytest.raises(DataError) as error:
        read_images_and_labels(missing, _good_labels(tmp_path))
    message = str(error.value)
    assert str(missing) in message and "not found" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data-dir" in message and ENV_VAR in message


def test_cut_gzip_stream_is_a_data_error(tmp_path: Path) -> None:
    good = _good_images(tmp_path, n=50).read_bytes()
    cut = tmp_path / "cut-images.gz"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="truncated or corrupt") as error:
        read_images_and_labels(cut, _good_labels(tmp_path, 50))
    assert str(cut) in str(error.value)


def test_image_and_label_counts_must_match(tmp_path: Path) -> None:
    images, labels = _good_images(tmp_path, 3), _good_labels(tmp_path, 2)
    with pytest.raises(DataError, match="has 3 images but .* has 2 labels") as error:
        read_images_and_labels(images, labels)
    assert str(images) in str(error.value) and str(labels) in str(error.value)


def test_labels_outside_0_to_9(tmp_path: Path) -> None:
    labels = _write(tmp_path / "labels.gz", _idx_bytes(LABEL_MAGIC, (2,), bytes([3, 10])))
    with pytest.raises(DataError, match=r"label 10 at index 1 is outside 0\.\.9") as error:
        read_images_and_labels(_good_images(tmp_path), labels)
    assert str(labels) in str(error.value)


def test_where_the_files_are_looked_for(
    tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert find_fashion_mnist(tiny_dir.parent) == tiny_dir  # <data_dir>/fashion-mnist
    assert find_fashion_mnist(tiny_dir) == tiny_dir  # the files in data_dir itself
    assert find_fashion_mnist(tmp_path) == Path("/usr/share/datasets/fashion-mnist")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "elsewhere"))
    assert find_fashion_mnist(tiny_dir) == tmp_path / "elsewhere"
    with pytest.raises(DataError, match="elsewhere.*apt-get install dataset-fashion-mnist"):
        _tiny_task().load(tiny_dir, None, None, 0)


# -- splits and normalisation -----------------------------------------------------------------


def _refs(examples: list[Example]) -> list[tuple[str, int]]:
    return [image_ref(e) for e in examples]


def test_splits_are_disjoint_sized_and_follow_data_seed(tiny_dir: Path) -> None:
    task = _tiny_task()
    full = task.load(tiny_dir, None, None, 0)
    assert (len(full.train), len(full.validation), len(full.test)) == (260, 40, 50)
    train, validation, test = _refs(full.train), _refs(full.validation), _refs(full.test)
    assert {s for s, _ in train + validation} == {"train"} and {s for s, _ in test} == {"t10k"}
    assert not set(train) & set(validation)
    assert sorted(i for _, i in train + validation) == list(range(300))
    assert sorted(i for _, i in test) == list(range(50))
    assert all(e.label == i % 10 for e, (_, i) in zip(full.train, train, strict=True))

    small = task.load(tiny_dir, 64, 16, 0, test_size=10)
    assert (len(small.train), len(small.validation), len(small.test)) == (64, 16, 10)
    assert _refs(small.train) == train[:64]  # train_size takes a prefix of the same order
    assert set(_refs(small.validation)) <= set(validation)
    assert _refs(task.load(tiny_dir, 64, 16, 0, test_size=10).test) == _refs(small.test)

    other = task.load(tiny_dir, None, None, 1)
    assert set(_refs(other.validation)) != set(validation)
    assert set(_refs(other.test)) == set(test)  # the official test file whatever the seed


def test_pixels_are_normalised_with_training_split_statistics(tiny_dir: Path) -> None:
    task = _tiny_task()
    data = task.load(tiny_dir, None, None, 0)
    raw = read_idx(tiny_dir / "train-images-idx3-ubyte.gz", IMAGE_MAGIC).astype(np.float64)
    train_pixels = raw[[i for _, i in _refs(data.train)]] / 255.0
    assert data.info["pixel_mean"] == pytest.approx(train_pixels.mean(), abs=1e-6)
    assert data.info["pixel_std"] == pytest.approx(train_pixels.std(), abs=1e-6)
    _, collate = task.build(dropout=None, max_length=128, data=data)
    inputs, target = collate(data.train)
    pixels = inputs["pixel_values"]
    assert pixels.dtype == torch.float32 and pixels.shape == (260, 1, 28, 28)
    assert float(pixels.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(pixels.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    assert target.dtype == torch.long and target.tolist() == [e.label for e in data.train]


def test_collator_gathers_from_both_files() -> None:
    images = {
        "train": torch.arange(3, dtype=torch.uint8)[:, None, None].expand(3, 28, 28),
        "t10k": torch.tensor([200, 255], dtype=torch.uint8)[:, None, None].expand(2, 28, 28),
    }
    collate = ImageCollator(images, mean=0.0, std=1.0)
    batch = [Example(("t10k:1",), 0), Example(("train:2",), 5), Example(("t10k:0",), 9)]
    inputs, target = collate(batch)
    assert inputs["pixel_values"][:, 0, 0, 0].mul(255).round().tolist() == [255, 2, 200]
    assert target.tolist() == [0, 5, 9]
    with pytest.raises(ValueError, match="not an image example"):
        collate([Example(("a sentence",), 0)])


# -- models and hooks -------------------------------------------------------------------------


def test_model_output_shapes() -> None:
    x = torch.randn(5, 1, 28, 28)
    assert VisionTransformer()(x).shape == (5, 10)
    assert VisionTransformer(patch_size=4, d_model=32, num_layers=1)(x).shape == (5, 10)
    assert SmallCNN()(x).shape == (5, 10)


def test_cnn_has_one_dropout_just_before_the_classifier_and_no_batchnorm() -> None:
    model = SmallCNN()
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    dropouts = [n for n, m in leaves if isinstance(m, _DropoutNd)]
    assert dropouts == ["dropout"] and model.dropout.p == 0.5
    assert [n for n, _ in leaves[-2:]] == ["dropout", "classifier"]
    assert isinstance(model.classifier, nn.Linear) and model.classifier.out_features == 10
    assert not any(isinstance(m, (_BatchNorm, nn.GroupNorm, nn.LayerNorm)) for _, m in leaves)
    assert active_dropout_modules(model) == ["dropout"]


def test_vit_has_dropout_in_embeddings_attention_and_mlp() -> None:
    model = VisionTransformer(dropout=0.1)
    assert model.embedding.dropout.p == 0.1
    assert len(model.blocks) == 4
    for block in model.blocks:
        assert block.norm_first
        assert block.self_attn.dropout == 0.1  # attention weights
        assert block.dropout1.p == 0.1  # attention output
        assert block.dropout.p == 0.1 and block.dropout2.p == 0.1  # inside and after the MLP
    built, _ = FashionMNISTViT().build(dropout=0.3, max_length=1, data=_fake_data())
    rates = {m.p for m in built.modules() if isinstance(m, _DropoutNd)}
    rates |= {m.dropout for m in built.modules() if isinstance(m, nn.MultiheadAttention)}
    assert rates == {0.3}
    x = torch.randn(4, 1, 28, 28)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def _fake_data() -> TaskData:
    images = {"train": torch.zeros(2, 28, 28, dtype=torch.uint8)}
    return TaskData([], [], [], {}, {"images": images, "pixel_mean": 0.3, "pixel_std": 0.35})


@pytest.mark.parametrize("name", ["fmnist_vit", "fmnist_cnn"])
def test_regularizer_hooks(name: str) -> None:
    task = get_task(name)
    data = _fake_data()
    model, _ = task.build(dropout=None, max_length=1, data=data)
    assert data.info["parameters"] == sum(p.numel() for p in model.parameters())
    assert task.mixup_input_key == "pixel_values"
    assert task.embedding_module(model) is None
    layers = task.mixing_layers(model)
    expected_first = "embedding" if name == "fmnist_vit" else "blocks.0"
    assert layers[0] == expected_first and len(layers) >= 3
    calls: dict[str, list[tuple[int, ...]]] = {layer: [] for layer in layers}
    handles = [
        model.get_submodule(layer).register_forward_hook(
            lambda _m, _i, out, layer=layer: calls[layer].append(tuple(out.shape))
        )
        for layer in layers
    ]
    model(torch.randn(6, 1, 28, 28))
    for handle in handles:
        handle.remove()
    assert all(len(shapes) == 1 and shapes[0][0] == 6 for shapes in calls.values())
    mixer = rdrop.ManifoldMixup(model, layers=layers, alpha=2.0)
    y = torch.arange(6) % 10
    with mixer.mixing(y, generator=torch.Generator().manual_seed(0)) as mix:
        logits = model(torch.randn(6, 1, 28, 28))
    mix.loss(logits).backward()


# -- the real files -------------------------------------------------------------------------


@needs_real
def test_real_files_give_the_documented_splits() -> None:
    data = get_task("fmnist_cnn").load(REAL, None, None, 0)
    assert (len(data.train), len(data.validation), len(data.test)) == (55000, 5000, 10000)
    counts = np.bincount([e.label for e in data.test], minlength=10)
    assert counts.tolist() == [1000] * 10
    assert data.info["pixel_mean"] == pytest.approx(0.2860, abs=1e-3)
    assert data.info["pixel_std"] == pytest.approx(0.3530, abs=1e-3)


TINY = {
    "epochs": 1.0,
    "train_size": 64,
    "validation_size": 32,
    "test_size": 32,
    "batch_size": 16,
    "eval_batch_size": 32,
    "evals_per_epoch": 2,
    "probe_size": 8,
    "lr": 1e-3,
    "equal_time": False,
}


@needs_real
@pytest.mark.parametrize("name", ["fmnist_vit", "fmnist_cnn"])
@pytest.mark.parametrize("method", ["baseline", "rdrop"])
def test_tiny_end_to_end_run(name: str, method: str, tmp_path: Path) -> None:
    alpha = 1.0 if method == "rdrop" else None
    config = RunConfig(name, method, alpha=alpha, **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("error", rdrop.RDropWarning)  # e.g. BatchNorm on [x; x]
        record = train_run(config, ResultStore(tmp_path), data_dir=REAL)
    assert record["steps"] == 4
    test = record["selections"]["equal_epochs"]["test"]
    assert 0.0 <= test["accuracy"] <= 1.0
    assert record["task"]["test_examples"] == 32
    assert record["task"]["parameters"] > 10_000
    assert all(e["probe_kl"] > 0 for e in record["evals"])  # dropout is active
    assert all(math.isfinite(e["train_loss"]) for e in record["evals"])
    if method == "rdrop":
        assert all(e["consistency_loss"] > 0 for e in record["evals"])
