"""Where the examples come from: dataset names, IDX files and TFDS.

A dataset name resolves to a `DatasetSpec` (normalization constants, augmentation,
in-memory or streamed) and to a source:

- MNIST family (`mnist`, `fashion_mnist`): IDX files when `data_dir` holds them;
  `fashion_mnist` also finds Debian's `dataset-fashion-mnist` package; TFDS otherwise.
- Any TFDS dataset (`cifar10`, `cifar100`, `imagenet2012`, or any other image
  classification name): random access through `tfds.data_source` (array_record files,
  no TensorFlow needed); datasets prepared as TFRecord are read through tf.data when
  TensorFlow is installed (in-memory datasets only).

Normalization constants (`KNOWN_DATASETS`) are per-channel statistics of the training
split on pixels scaled to [0, 1] (torchvision's values for MNIST and ImageNet); any
other TFDS dataset gets mean 0.5 and std 0.5, which maps pixels to [-1, 1].
`authors_spec` gives the training input of the authors' code instead.

A validation split can be held out of the training split (`validation_size`): a fixed
random subset, the same for every run and seed, read as the split "holdout"; the
training split is then what remains.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IDX_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
# Datasets with a fixed image shape and at most this many bytes of uint8 pixels are
# held in host memory and augmented on the device; larger ones stream through grain.
IN_MEMORY_MAX_BYTES = 4 * 2**30
# The validation split held out of the training split (`load_arrays(validation_size=)`).
HOLDOUT_SPLIT = "holdout"
# Fixes which examples are held out: one subset for every run and seed.
HOLDOUT_SEED = 1705_08741


class DatasetNotFoundError(FileNotFoundError, ValueError):
    """A known dataset whose files are not on this machine; the message says how to get them."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How one dataset is read, augmented and normalized.

    Attributes:
      tfds_name: the TFDS name (also the name used in configs).
      train_split: split used for training.
      eval_split: split used for evaluation when none is given.
      mean: per-channel mean of pixels in [0, 1].
      std: per-channel standard deviation of pixels in [0, 1].
      augmentation: "none", "crop_flip" (pad, random crop, horizontal flip) or
        "inception" (random resized crop 224 and flip; eval resize 256, center crop 224).
      in_memory: hold the uint8 split in host memory (else stream through grain).
      pad: pixels of padding on each side before the random crop ("crop_flip").
      fill: the padding's pixel value (0-255).
      frame: pixels of black (0) border added once on each side of every image, train
        and eval, when the split is loaded: a variant of the dataset ``tfds_name``
        (Fashion-MNIST 28x28 -> 32x32 for CIFAR models such as ResNet-44).
    """

    tfds_name: str
    train_split: str
    eval_split: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augmentation: str
    in_memory: bool
    pad: int = 4
    fill: int = 0
    frame: int = 0


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

KNOWN_DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec("mnist", "train", "test", (0.1307,), (0.3081,), "none", True),
    "fashion_mnist": DatasetSpec(
        "fashion_mnist", "train", "test", (0.2860,), (0.3530,), "none", True
    ),
    "cifar10": DatasetSpec(
        "cifar10",
        "train",
        "test",
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        "crop_flip",
        True,
    ),
    "cifar100": DatasetSpec(
        "cifar100",
        "train",
        "test",
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        "crop_flip",
        True,
    ),
    "imagenet2012": DatasetSpec(
        "imagenet2012", "train", "validation", IMAGENET_MEAN, IMAGENET_STD, "inception", False
    ),
}
# The MNIST family framed to 32x32 (2 black pixels each side), the input size of the
# CIFAR models; same files, same splits, same held-out validation examples.
for _name in ("mnist", "fashion_mnist"):
    KNOWN_DATASETS[f"{_name}_32"] = dataclasses.replace(KNOWN_DATASETS[_name], frame=2)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to know about a dataset.

    Attributes:
      name: dataset name as given.
      num_train: examples in the training split.
      num_eval: examples in the evaluation split.
      num_classes: number of labels.
      image_shape: (H, W, C) of the images the iterators yield.
      source: where the examples are read from ("idx:<dir>" or "tfds").
    """

    name: str
    num_train: int
    num_eval: int
    num_classes: int
    image_shape: tuple[int, int, int]
    source: str = "tfds"


def _missing_message(name: str, data_dir: str | None) -> str:
    where = f"--data_dir={data_dir}" if data_dir else "--data_dir=~/tensorflow_datasets"
    lines = [f"dataset {name!r} was not found (data_dir={data_dir!r}). To get it:"]
    if name == "fashion_mnist":
        lines.append(
            f"  * sudo apt-get install dataset-fashion-mnist  (IDX files in "
            f"{DEBIAN_FASHION_MNIST_DIR}, used automatically), or"
        )
    if name in ("mnist", "fashion_mnist"):
        lines.append(
            "  * pass data_dir=<directory with train-images-idx3-ubyte.gz, "
            "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz>, or"
        )
    lines.append(
        f"  * pip install 'gbn_jax[tfds-prepare]' && tfds build {name} "
        f"--file_format=array_record {where}"
    )
    if name == "imagenet2012":
        lines.append(
            "    (ImageNet needs ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
            "<data_dir>/downloads/manual first)"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- IDX files


def find_idx_dir(name: str, data_dir: str | None) -> str | None:
    """Returns the directory holding the IDX files of an MNIST-family dataset, or None."""
    candidates = []
    if data_dir:
        candidates += [data_dir, os.path.join(data_dir, name)]
    if name == "fashion_mnist":
        candidates.append(DEBIAN_FASHION_MNIST_DIR)
    for directory in candidates:
        if all(_idx_path(directory, split, "images") for split in IDX_SPLIT_PREFIX):
            return directory
    return None


def _idx_path(directory: str, split: str, kind: str) -> str | None:
    suffix = "images-idx3-ubyte" if kind == "images" else "labels-idx1-ubyte"
    stem = os.path.join(directory, f"{IDX_SPLIT_PREFIX[split]}-{suffix}")
    for path in (stem + ".gz", stem):
        if os.path.isfile(path):
            return path
    return None


def _open_idx(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _idx_header(stream, path: str) -> tuple[int, ...]:
    # IDX: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions,
    # then one big-endian int32 per dimension.
    magic = stream.read(4)
    if len(magic) != 4 or magic[:2] != b"\x00\x00" or magic[2] != 0x08:
        raise ValueError(f"{path=} is not an unsigned-byte IDX file (magic={magic!r})")
    return tuple(int(d) for d in np.frombuffer(stream.read(4 * magic[3]), dtype=">i4"))


def read_idx(path: str) -> np.ndarray:
    """Reads an unsigned-byte IDX file (optionally gzipped) into a uint8 array.

    Args:
      path: the file, e.g. train-images-idx3-ubyte.gz.

    Returns:
      uint8 array of the shape stored in the header.
    """
    with _open_idx(path) as stream:
        shape = _idx_header(stream, path)
        data = np.frombuffer(stream.read(), dtype=np.uint8)
    if data.size != math.prod(shape):
        raise ValueError(f"{path=} holds {data.size} bytes, its header says {shape}")
    return data.reshape(shape)


def _idx_num_examples(directory: str, split: str) -> int:
    path = _idx_path(directory, split, "labels")
    with _open_idx(path) as stream:
        return _idx_header(stream, path)[0]


# ---------------------------------------------------------------------------- TFDS


def tfds_builder(name: str, data_dir: str | None):
    """Returns the TFDS builder of `name`, or raises ValueError for unknown names."""
    import tensorflow_datasets as tfds  # Slow import, only needed off the IDX path.

    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as e:
        raise ValueError(
            f"unknown dataset {name=}: not one of {sorted(KNOWN_DATASETS)} and not a TFDS "
            "dataset name (see https://www.tensorflow.org/datasets/catalog); fix the name."
        ) from e


def tfds_data_source(name: str, split: str, data_dir: str | None) -> Sequence[dict[str, Any]]:
    """Opens a random-access TFDS split (array_record files, no TensorFlow needed).

    Raises:
      DatasetNotFoundError: the dataset is not prepared under `data_dir`.
      NotImplementedError: it is prepared, but as TFRecord files (see `tfds_load_numpy`).
    """
    builder = tfds_builder(name, data_dir)
    try:
        return builder.as_data_source(split=split)
    except NotImplementedError:
        # TFDS raises this both for "not prepared" and for "prepared as TFRecord".
        if builder.is_prepared():
            raise
        raise DatasetNotFoundError(_missing_message(name, data_dir)) from None


def random_access_source(name: str, split: str, data_dir: str | None) -> Sequence[dict[str, Any]]:
    """`tfds_data_source` for streamed (grain) datasets, which need array_record files."""
    try:
        return tfds_data_source(name, split, data_dir)
    except NotImplementedError:
        raise DatasetNotFoundError(
            f"dataset {name!r} under {data_dir=} is prepared as TFRecord files; streaming it "
            "needs random access. Rebuild it: pip install 'gbn_jax[tfds-prepare]' && "
            f"tfds build {name} --file_format=array_record --data_dir={data_dir or '<dir>'}"
        ) from None


def tfds_load_numpy(name: str, split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Reads a TFRecord-format TFDS split into memory through tf.data (needs TensorFlow)."""
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        raise DatasetNotFoundError(
            f"dataset {name!r} under {data_dir=} is prepared as TFRecord files, which need "
            "TensorFlow to read. Either pip install 'gbn_jax[tfds-prepare]', or rebuild it "
            f"for random access: tfds build {name} --file_format=array_record "
            f"--data_dir={data_dir or '~/tensorflow_datasets'}"
        ) from None
    import tensorflow_datasets as tfds

    arrays = tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir, batch_size=-1))
    return np.asarray(arrays["image"], np.uint8), np.asarray(arrays["label"], np.int32)


def spec_for(name: str, data_dir: str | None = None) -> DatasetSpec:
    """Returns the `DatasetSpec` of a known dataset or of any TFDS image dataset."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty string, got {name=}")
    if name in KNOWN_DATASETS:
        return KNOWN_DATASETS[name]
    builder = tfds_builder(name, data_dir)
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise ValueError(
            f"TFDS dataset {name=} has features {sorted(features)}, not 'image' and 'label'; "
            "only image-classification datasets are supported"
        )
    image_shape = tuple(features["image"].shape)
    splits = set(builder.info.splits.keys())
    eval_split = "test" if "test" in splits or not splits else "validation"
    num_train = builder.info.splits["train"].num_examples if "train" in splits else 0
    fixed = None not in image_shape
    small = fixed and num_train * math.prod(image_shape) <= IN_MEMORY_MAX_BYTES
    channels = image_shape[-1] or 3
    if small:
        return DatasetSpec(
            name, "train", eval_split, (0.5,) * channels, (0.5,) * channels, "none", True
        )
    return DatasetSpec(name, "train", eval_split, IMAGENET_MEAN, IMAGENET_STD, "inception", False)


def authors_spec(spec: DatasetSpec) -> DatasetSpec:
    """The authors' training input for a dataset (their code, eladhoffer/bigBatch).

    Args:
      spec: the dataset's own spec.

    Returns:
      MNIST family: pad 2 (zeros) to 32x32, random 28x28 crop, random horizontal flip,
      mean 0.5, std 0.5. CIFAR: pad 4 with 127, random 32x32 crop, flip, ImageNet's
      mean and std (their default normalization).

    Raises:
      ValueError: a dataset whose authors' preprocessing is not implemented here.
    """
    if spec.tfds_name in ("mnist", "fashion_mnist"):
        return dataclasses.replace(
            spec, mean=(0.5,), std=(0.5,), augmentation="crop_flip", pad=2, fill=0
        )
    if spec.tfds_name in ("cifar10", "cifar100"):
        return dataclasses.replace(
            spec,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            augmentation="crop_flip",
            pad=4,
            fill=127,
        )
    raise ValueError(
        f"the authors' input pipeline is implemented for the MNIST family and CIFAR, not "
        f"{spec.tfds_name!r}; use augment='default'."
    )


def holdout_indices(num_train: int, validation_size: int) -> np.ndarray:
    """The training-split indices held out as the validation split, sorted.

    A fixed random subset (seeded by HOLDOUT_SEED, not by the run's seed), so that all
    runs select and compare on the same examples.

    Args:
      num_train: examples in the whole training split.
      validation_size: examples to hold out, 0 < validation_size < num_train.

    Returns:
      int64 indices, sorted.

    Raises:
      ValueError: a size outside (0, num_train).
    """
    if isinstance(validation_size, bool) or not 0 < validation_size < num_train:
        raise ValueError(
            f"{validation_size=} must lie strictly between 0 and the {num_train} training "
            f"examples (e.g. validation=10000 for the MNIST family)."
        )
    order = np.random.default_rng(HOLDOUT_SEED).permutation(num_train)
    return np.sort(order[:validation_size])


# ---------------------------------------------------------------------------- arrays


@functools.lru_cache(maxsize=8)
def load_arrays(
    name: str, split: str, data_dir: str | None = None, validation_size: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Loads a whole split into host memory (cached per process).

    Args:
      name: dataset name.
      split: "train", "test", ..., or "holdout" (the validation split held out of the
        training split; needs ``validation_size``).
      data_dir: directory of IDX files (MNIST family) or of prepared TFDS data.
      validation_size: examples held out of the training split (`holdout_indices`);
        with it, the training split is what remains. 0: nothing held out.

    Returns:
      (images uint8 (N, H, W, C), labels int32 (N,)), both read-only.
    """
    spec = spec_for(name, data_dir)
    if spec.frame:
        images, labels = load_arrays(spec.tfds_name, split, data_dir, validation_size)
        framed = np.pad(images, ((0, 0), (spec.frame,) * 2, (spec.frame,) * 2, (0, 0)))
        framed.flags.writeable = False
        return framed, labels
    train_split = spec.train_split
    if split == HOLDOUT_SPLIT or (validation_size and split == train_split):
        if not validation_size:
            raise ValueError(
                f"split {HOLDOUT_SPLIT!r} is held out of the training split; give its size "
                f"(validation_size=, the config's validation= option)."
            )
        images, labels = load_arrays(name, train_split, data_dir)
        held = np.zeros(len(labels), bool)
        held[holdout_indices(len(labels), validation_size)] = True
        keep = held if split == HOLDOUT_SPLIT else ~held
        images, labels = images[keep], labels[keep]
        images.flags.writeable = False
        labels.flags.writeable = False
        return images, labels
    idx_dir = find_idx_dir(name, data_dir) if name in ("mnist", "fashion_mnist") else None
    if idx_dir is not None:
        if split not in IDX_SPLIT_PREFIX:
            raise ValueError(f"{split=} is not an IDX split; use one of {list(IDX_SPLIT_PREFIX)}")
        images = read_idx(_idx_path(idx_dir, split, "images"))[..., None]
        labels = read_idx(_idx_path(idx_dir, split, "labels")).astype(np.int32)
    else:
        try:
            source = tfds_data_source(name, split, data_dir)
        except NotImplementedError:
            images, labels = tfds_load_numpy(name, split, data_dir)
        else:
            images, labels = _read_all(source)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{name=} {split=}: {images.shape[0]} images, {labels.shape[0]} labels")
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _read_all(source: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    first = source[0]
    images = np.empty((len(source), *np.shape(first["image"])), np.uint8)
    labels = np.empty((len(source),), np.int32)
    for i in range(len(source)):
        example = source[i]
        images[i] = example["image"]
        labels[i] = example["label"]
    return images, labels


def get_dataset_info(name: str, data_dir: str | None = None) -> DatasetInfo:
    """Describes a dataset without loading its pixels.

    Args:
      name: "mnist", "fashion_mnist" (or "mnist_32", "fashion_mnist_32", framed to
        32x32), "cifar10", "cifar100", "imagenet2012" or any TFDS
        image-classification name.
      data_dir: directory of IDX files (MNIST family) or of prepared TFDS data.

    Returns:
      A `DatasetInfo`.

    Raises:
      ValueError: unknown name.
      DatasetNotFoundError: the dataset is not on this machine (the message says how to
        get it).
    """
    spec = spec_for(name, data_dir)
    if spec.frame:
        info = get_dataset_info(spec.tfds_name, data_dir)
        height, width, channels = info.image_shape
        return dataclasses.replace(
            info,
            name=name,
            image_shape=(height + 2 * spec.frame, width + 2 * spec.frame, channels),
        )
    idx_dir = find_idx_dir(name, data_dir) if name in ("mnist", "fashion_mnist") else None
    if idx_dir is not None:
        return DatasetInfo(
            name=name,
            num_train=_idx_num_examples(idx_dir, "train"),
            num_eval=_idx_num_examples(idx_dir, "test"),
            num_classes=10,
            image_shape=(28, 28, 1),
            source=f"idx:{idx_dir}",
        )
    builder = tfds_builder(spec.tfds_name, data_dir)
    try:
        num_train = len(tfds_data_source(spec.tfds_name, spec.train_split, data_dir))
        num_eval = len(tfds_data_source(spec.tfds_name, spec.eval_split, data_dir))
    except NotImplementedError:  # Prepared as TFRecord: the split sizes are in the metadata.
        num_train = builder.info.splits[spec.train_split].num_examples
        num_eval = builder.info.splits[spec.eval_split].num_examples
    image_shape = tuple(builder.info.features["image"].shape)
    if not spec.in_memory:
        image_shape = (224, 224, image_shape[-1] or 3)
    return DatasetInfo(
        name=name,
        num_train=num_train,
        num_eval=num_eval,
        num_classes=builder.info.features["label"].num_classes,
        image_shape=image_shape,
        source="tfds",
    )
