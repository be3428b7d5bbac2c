"""Classification tasks: the benchmark's data, split once, the same way everywhere.

A :class:`Task` holds train, validation and test arrays: features as float64 ``(n, n_features)``
and labels as int64 in ``0 .. n_classes-1``. :func:`load_task` builds one from a name, a
user's ``.npz`` file or the user's own arrays. Nothing is ever downloaded at run time.

Splits (all stratified; ``seed`` is their ``random_state``, and the benchmark protocol is
``seed=0``: pass a *training* seed elsewhere, never here):

============== ===================================================== ===================
task           source                                                train / val / test
============== ===================================================== ===================
digits         scikit-learn ``load_digits`` (shipped with it)         1000 / 297 / 500
iris           scikit-learn ``load_iris``: 30 % test, 20 % of the     84 / 21 / 45
               rest as validation
wine           scikit-learn ``load_wine``: same fractions             99 / 25 / 54
fashion-mnist  the four IDX files (below); the 10k test set is the    55000 / 5000 / 10000
               test set; 5000 training images held out as validation
FILE.npz       the user's ``x_train, y_train, x_test, y_test``;       user's
               20 % of train held out as validation, unless the
               file also holds ``x_val, y_val``
arrays         ``(x_train, y_train, x_test, y_test)``: as for npz     user's
============== ===================================================== ===================

The digits numbers are the benchmark protocol (docs/protocol.md): 1297 train and 500 test (stratified,
``random_state=0``), then 297 of the training images held out as validation.

Features are kept in their raw units (digits: pixel values 0..16, Fashion-MNIST: 0..255,
images flattened). The fixed encoding (:mod:`blackbox_sat.data.encoding`) standardizes them.

Fashion-MNIST's files are found and read by :mod:`blackbox_sat.data.idx`. The validation
set holds 5000 training images (stratified), or a fifth of the training images if that is fewer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from blackbox_sat.data.idx import IDXFormatError, find_fashion_mnist, read_fashion_files
from blackbox_sat.devices.contract import InvalidInput, InvalidType

#: Names accepted by :func:`load_task` (and the CLI's ``--task``).
TASK_NAMES: tuple[str, ...] = ("digits", "iris", "wine", "fashion-mnist")
#: The task used when none is given.
DEFAULT_TASK = "digits"

#: the benchmark protocol (docs/protocol.md) for digits.
DIGITS_N_TEST = 500
DIGITS_N_VAL = 297
#: Fractions for iris and wine: test out of all, validation out of what is left.
SMALL_TEST_FRACTION = 0.3
SMALL_VAL_FRACTION = 0.2
#: Validation fraction carved from a user's training data.
USER_VAL_FRACTION = 0.2
#: Validation images held out of Fashion-MNIST's 60k training images.
FASHION_N_VAL = 5000

_REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")


class TaskDataError(InvalidInput):
    """A user's task data is malformed (missing key, wrong shape, non-finite values...)."""


@dataclass(frozen=True, eq=False)
class Task:
    """A classification task split into train, validation and test.

    ``x_*`` are float64 ``(n, n_features)``; ``y_*`` are int64 ``(n,)`` in
    ``0 .. n_classes-1``. ``classes[k]`` is the original label that ``k`` stands for.
    ``name`` is what :func:`load_task` was given (a name, an npz path, or ``"arrays"``).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    classes: np.ndarray

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    def summary(self) -> dict:
        """JSON-ready description (for ``result.json``)."""
        classes = self.classes.tolist()
        return {
            "name": self.name,
            "n_features": self.n_features,
            "n_classes": int(self.n_classes),
            "n_train": len(self.y_train),
            "n_val": len(self.y_val),
            "n_test": len(self.y_test),
            "classes": classes,
        }


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_task(
    spec=DEFAULT_TASK, seed: int = 0, *, data_dir: str | os.PathLike | None = None
) -> Task:
    """Load a task and split it (see the module docstring for the splits).

    ``spec``: a name in :data:`TASK_NAMES` (case-insensitive; ``_`` may stand for ``-``), a
    path to an ``.npz`` file, a tuple ``(x_train, y_train, x_test, y_test)``, a mapping with
    those keys (optionally ``x_val``, ``y_val``), or a :class:`Task` (returned as is).
    ``seed`` is the ``random_state`` of every split; 0 is the benchmark protocol.
    ``data_dir`` is searched first for Fashion-MNIST's files.
    """
    if spec is None:
        spec = DEFAULT_TASK
    if isinstance(spec, Task):
        return spec
    if isinstance(spec, Mapping):
        return _from_arrays(dict(spec), name="arrays", seed=seed, source="the task mapping")
    if isinstance(spec, (tuple, list)):
        if len(spec) != 4:
            raise TaskDataError(
                f"a task given as arrays must be (x_train, y_train, x_test, y_test); got a "
                f"{type(spec).__name__} of length {len(spec)}"
            )
        return _from_arrays(
            dict(zip(_REQUIRED_KEYS, spec)), name="arrays", seed=seed, source="the task arrays"
        )
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        key = text.strip().lower().replace("_", "-")
        if key in ("fashionmnist", "fashion"):
            key = "fashion-mnist"
        if key == "digits":
            return _load_digits(seed)
        if key in ("iris", "wine"):
            return _load_small(key, seed)
        if key == "fashion-mnist":
            return _load_fashion_mnist(seed, data_dir)
        path = Path(text).expanduser()
        if path.is_file() or text.endswith(".npz"):
            return _load_npz(path, seed)
        raise InvalidInput(
            f"unknown task {text!r}: expected one of {', '.join(TASK_NAMES)}, or a path to an "
            ".npz file with x_train, y_train, x_test, y_test"
        )
    raise InvalidType(
        f"task must be a name, an .npz path, or (x_train, y_train, x_test, y_test); got "
        f"{type(spec).__name__}"
    )


def _stratified_split(x, y, test_size, seed, stratify=True):
    """Split (x, y) with ``train_test_split``, stratified when every class allows it."""
    if stratify:
        try:
            return train_test_split(x, y, test_size=test_size, stratify=y, random_state=seed)
        except ValueError:
            pass  # a class too small to stratify: fall back to a plain shuffled split
    return train_test_split(x, y, test_size=test_size, random_state=seed)


def _make_task(name, x_train, y_train, x_val, y_val, x_test, y_test, classes) -> Task:
    def xs(a):
        return np.ascontiguousarray(a, dtype=np.float64)

    def ys(a):
        return np.ascontiguousarray(a, dtype=np.int64)

    return Task(
        name=name,
        x_train=xs(x_train),
        y_train=ys(y_train),
        x_val=xs(x_val),
        y_val=ys(y_val),
        x_test=xs(x_test),
        y_test=ys(y_test),
        n_classes=len(classes),
        classes=np.asarray(classes),
    )


def _load_digits(seed: int) -> Task:
    from sklearn.datasets import load_digits

    data = load_digits()
    x, y = data.data, data.target
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=DIGITS_N_TEST, stratify=y, random_state=seed
    )
    x_tr, x_va, y_tr, y_va = train_test_split(
        x_tr, y_tr, test_size=DIGITS_N_VAL, stratify=y_tr, random_state=seed
    )
    return _make_task("digits", x_tr, y_tr, x_va, y_va, x_te, y_te, np.arange(10))


def _load_small(name: str, seed: int) -> Task:
    from sklearn import datasets

    data = {"iris": datasets.load_iris, "wine": datasets.load_wine}[name]()
    x, y = data.data, data.target
    classes = np.unique(y)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=SMALL_TEST_FRACTION, stratify=y, random_state=seed
    )
    x_tr, x_va, y_tr, y_va = train_test_split(
        x_tr, y_tr, test_size=SMALL_VAL_FRACTION, stratify=y_tr, random_state=seed
    )
    return _make_task(name, x_tr, y_tr, x_va, y_va, x_te, y_te, classes)


def _load_npz(path: Path, seed: int) -> Task:
    if not path.is_file():
        raise FileNotFoundError(
            f"task file {path} not found (expected an .npz with {', '.join(_REQUIRED_KEYS)})"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ValueError as exc:
        raise TaskDataError(
            f"{path}: could not read the arrays ({exc}); store plain numeric arrays "
            "(object arrays are refused)"
        ) from exc
    except Exception as exc:  # not a zip/npy at all
        raise TaskDataError(f"{path}: not a readable .npz file ({exc})") from exc
    return _from_arrays(arrays, name=str(path), seed=seed, source=str(path))


def _check_x(key, x, source):
    try:
        x = np.asarray(x)
    except Exception as exc:  # ragged lists
        raise TaskDataError(f"{source}: {key} is not an array ({exc})") from exc
    if x.ndim < 2:
        raise TaskDataError(
            f"{source}: {key} must have shape (n_samples, n_features); got shape {x.shape}"
        )
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise TaskDataError(f"{source}: {key} must be numeric; got dtype {x.dtype}")
    if x.ndim > 2:  # images: flatten each sample
        x = x.reshape(x.shape[0], -1)
    x = x.astype(np.float64)
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise TaskDataError(f"{source}: {key} is empty (shape {x.shape})")
    bad = ~np.isfinite(x)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise TaskDataError(
            f"{source}: {key} has {int(bad.sum())} non-finite values (NaN or inf), in "
            f"{len(rows)} rows, first at row {int(rows[0])}"
        )
    return x


def _check_y(key, y, n, source):
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.shape != (n,):
        hint = " (one-hot labels? pass their argmax)" if y.ndim == 2 else ""
        raise TaskDataError(
            f"{source}: {key} must have shape ({n},) to match the rows of x_{key[2:]}; got "
            f"shape {y.shape}{hint}"
        )
    if y.dtype.kind == "f":
        if not np.isfinite(y).all():
            raise TaskDataError(f"{source}: {key} has non-finite labels (NaN or inf)")
        if not np.all(y == np.round(y)):
            raise TaskDataError(
                f"{source}: {key} holds non-integer float labels; classification needs "
                "class labels (integers or strings)"
            )
    elif y.dtype.kind not in "iubUS":
        raise TaskDataError(
            f"{source}: {key} must hold integer or string labels; got dtype {y.dtype}"
        )
    return y


def _from_arrays(arrays: dict, name: str, seed: int, source: str) -> Task:
    missing = [k for k in _REQUIRED_KEYS if k not in arrays]
    if missing:
        raise TaskDataError(
            f"{source}: missing key(s) {', '.join(missing)}; a task needs "
            f"{', '.join(_REQUIRED_KEYS)} (x_*: (n, n_features), y_*: (n,)), optionally x_val, "
            f"y_val; found {', '.join(sorted(arrays)) or 'nothing'}"
        )
    has_val = "x_val" in arrays or "y_val" in arrays
    if has_val and not ("x_val" in arrays and "y_val" in arrays):
        raise TaskDataError(f"{source}: x_val and y_val must be given together")
    parts = ("train", "val", "test") if has_val else ("train", "test")
    xs, ys = {}, {}
    for part in parts:
        xs[part] = _check_x(f"x_{part}", arrays[f"x_{part}"], source)
        ys[part] = _check_y(f"y_{part}", arrays[f"y_{part}"], xs[part].shape[0], source)
    n_features = xs["train"].shape[1]
    for part in parts[1:]:
        if xs[part].shape[1] != n_features:
            raise TaskDataError(
                f"{source}: x_{part} must have shape (n_{part}, {n_features}) like x_train; got "
                f"{xs[part].shape}"
            )
    label_kinds = {ys[p].dtype.kind in "US" for p in parts}
    if len(label_kinds) > 1:
        raise TaskDataError(f"{source}: labels mix strings and numbers across splits")

    classes = np.unique(ys["train"])
    if len(classes) < 2:
        raise TaskDataError(f"{source}: y_train has {len(classes)} class; need at least 2")
    for part in parts[1:]:
        unseen = np.setdiff1d(np.unique(ys[part]), classes)
        if len(unseen):
            raise TaskDataError(
                f"{source}: y_{part} has labels absent from y_train: {unseen[:10].tolist()}"
            )
    labels = {p: np.searchsorted(classes, ys[p]) for p in parts}

    if has_val:
        x_tr, y_tr, x_va, y_va = xs["train"], labels["train"], xs["val"], labels["val"]
    else:
        if len(labels["train"]) < 2:
            raise TaskDataError(
                f"{source}: x_train needs at least 2 rows to carve a validation set"
            )
        x_tr, x_va, y_tr, y_va = _stratified_split(
            xs["train"], labels["train"], USER_VAL_FRACTION, seed
        )
    return _make_task(name, x_tr, y_tr, x_va, y_va, xs["test"], labels["test"], classes)


def _load_fashion_mnist(seed: int, data_dir) -> Task:
    paths = find_fashion_mnist(data_dir)
    # evaluate() reloads the task for every chip of a sweep: read the 60k images once per
    # process, keyed by the files' identity so a changed file is read again.
    arr = read_fashion_files(
        tuple(sorted((k, str(p), p.stat().st_mtime_ns) for k, p in paths.items()))
    )
    for part in ("train", "test"):
        x, y = arr[f"x_{part}"], arr[f"y_{part}"]
        if x.ndim < 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise IDXFormatError(
                f"Fashion-MNIST {part} files disagree: images {paths[f'x_{part}']} have shape "
                f"{x.shape}, labels {paths[f'y_{part}']} have shape {y.shape}; expected "
                "(n, rows, cols) and (n,)"
            )
    x_train = arr["x_train"].reshape(len(arr["x_train"]), -1)
    x_test = arr["x_test"].reshape(len(arr["x_test"]), -1)
    if x_train.shape[1] != x_test.shape[1]:
        raise IDXFormatError(
            f"Fashion-MNIST train images have {x_train.shape[1]} pixels, "
            f"test images {x_test.shape[1]}"
        )
    classes = np.unique(arr["y_train"])
    unseen = np.setdiff1d(np.unique(arr["y_test"]), classes)
    if len(unseen):
        raise IDXFormatError(f"Fashion-MNIST test labels absent from training: {unseen.tolist()}")
    y_train = np.searchsorted(classes, arr["y_train"])
    y_test = np.searchsorted(classes, arr["y_test"])
    n_val = min(FASHION_N_VAL, len(y_train) // 5)
    if n_val < 1:
        raise IDXFormatError(f"Fashion-MNIST training set too small ({len(y_train)} images)")
    x_tr, x_va, y_tr, y_va = _stratified_split(x_train, y_train, n_val, seed)
    return _make_task("fashion-mnist", x_tr, y_tr, x_va, y_va, x_test, y_test, classes)
