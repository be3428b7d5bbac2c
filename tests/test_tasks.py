"""Tasks: the benchmark's splits, user data validation, the IDX reader, Fashion-MNIST lookup."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from blackbox_sat.data import idx, tasks
from blackbox_sat.data.idx import IDXFormatError, read_idx
from blackbox_sat.data.tasks import TASK_NAMES, Task, TaskDataError, load_task

# ---------------------------------------------------------------------------------------------
# digits: the benchmark protocol
# ---------------------------------------------------------------------------------------------


def _sorted_rows(x, y):
    """Rows of [x | y] in lexicographic order: a multiset fingerprint of a dataset."""
    m = np.column_stack([x, y])
    return m[np.lexsort(m.T[::-1])]


def test_digits_split_sizes_and_types():
    t = load_task("digits")
    assert isinstance(t, Task)
    assert (len(t.y_train), len(t.y_val), len(t.y_test)) == (1000, 297, 500)
    assert (
        t.x_train.shape == (1000, 64) and t.x_val.shape == (297, 64) and t.x_test.shape == (500, 64)
    )
    assert t.n_classes == 10 and t.n_features == 64
    for x in (t.x_train, t.x_val, t.x_test):
        assert x.dtype == np.float64
    for y in (t.y_train, t.y_val, t.y_test):
        assert y.dtype == np.int64 and y.min() >= 0 and y.max() <= 9
    assert load_task().summary() == t.summary()  # digits is the default


def test_digits_splits_partition_the_dataset():
    """Train, val and test together are exactly the 1797 images, each used once."""
    t = load_task("digits")
    data = load_digits()
    got = _sorted_rows(
        np.vstack([t.x_train, t.x_val, t.x_test]), np.concatenate([t.y_train, t.y_val, t.y_test])
    )
    assert np.array_equal(got, _sorted_rows(data.data, data.target))


def test_digits_splits_are_stratified():
    t = load_task("digits")
    total = np.bincount(load_digits().target, minlength=10)
    test = np.bincount(t.y_test, minlength=10)
    assert np.all(np.abs(test - 500 * total / total.sum()) <= 1)
    pool = np.bincount(np.concatenate([t.y_train, t.y_val]), minlength=10)
    assert pool.sum() == 1297
    val = np.bincount(t.y_val, minlength=10)
    train = np.bincount(t.y_train, minlength=10)
    assert np.all(np.abs(val - 297 * pool / 1297) <= 1)
    assert np.all(np.abs(train - 1000 * pool / 1297) <= 1)


def test_digits_is_deterministic_and_seed_controls_the_split():
    a, b = load_task("digits"), load_task("digits", seed=0)
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    c = load_task("digits", seed=1)
    assert not np.array_equal(a.x_test, c.x_test)


@pytest.mark.parametrize(
    "name,sizes,n_features",
    [
        ("iris", (84, 21, 45), 4),
        ("wine", (99, 25, 54), 13),
    ],
)
def test_small_sklearn_tasks(name, sizes, n_features):
    t = load_task(name)
    assert (len(t.y_train), len(t.y_val), len(t.y_test)) == sizes
    assert t.n_features == n_features and t.n_classes == 3
    for y in (t.y_train, t.y_val, t.y_test):
        assert set(np.unique(y)) == {0, 1, 2}  # stratified: every class everywhere


def test_task_names_and_unknown_name():
    assert TASK_NAMES == ("digits", "iris", "wine", "fashion-mnist")
    assert load_task("DIGITS").name == "digits"
    with pytest.raises(ValueError, match="unknown task 'mnist'.*digits, iris, wine, fashion-mnist"):
        load_task("mnist")
    with pytest.raises(TypeError):
        load_task(3.5)


# ---------------------------------------------------------------------------------------------
# user data: npz and arrays
# ---------------------------------------------------------------------------------------------


def _user_arrays(rng, n_train=60, n_test=20, d=5, labels=(3, 7, 9)):
    labels = np.asarray(labels)
    return {
        "x_train": rng.normal(size=(n_train, d)),
        "y_train": labels[np.arange(n_train) % len(labels)],
        "x_test": rng.normal(size=(n_test, d)),
        "y_test": labels[np.arange(n_test) % len(labels)],
    }


def test_npz_loading_remaps_labels_and_carves_validation(tmp_path):
    arrays = _user_arrays(np.random.default_rng(0))
    path = tmp_path / "mine.npz"
    np.savez(path, **arrays)
    t = load_task(str(path))
    assert t.name == str(path)
    assert t.n_classes == 3 and t.classes.tolist() == [3, 7, 9]
    assert (len(t.y_train), len(t.y_val), len(t.y_test)) == (48, 12, 20)
    assert np.array_equal(t.classes[t.y_test], arrays["y_test"])  # test set kept in order
    assert np.array_equal(t.x_test, arrays["x_test"])
    assert set(np.unique(t.y_val)) == {0, 1, 2}  # stratified
    # train + val are exactly the user's training rows
    got = _sorted_rows(
        np.vstack([t.x_train, t.x_val]), t.classes[np.concatenate([t.y_train, t.y_val])]
    )
    assert np.array_equal(got, _sorted_rows(arrays["x_train"], arrays["y_train"]))
    again = load_task(path)  # Path objects work too, and the split is deterministic
    assert np.array_equal(again.x_val, t.x_val)


def test_npz_with_explicit_validation_and_string_labels(tmp_path):
    rng = np.random.default_rng(1)
    arrays = _user_arrays(rng, labels=("cat", "dog"))
    arrays["x_val"] = rng.normal(size=(6, 5))
    arrays["y_val"] = np.array(["dog", "cat"] * 3)
    np.savez(tmp_path / "v.npz", **arrays)
    t = load_task(tmp_path / "v.npz")
    assert len(t.y_train) == 60 and len(t.y_val) == 6
    assert t.classes.tolist() == ["cat", "dog"] and t.y_val.tolist() == [1, 0] * 3


def test_npz_missing_key(tmp_path):
    arrays = _user_arrays(np.random.default_rng(0))
    del arrays["y_test"]
    np.savez(tmp_path / "m.npz", **arrays)
    with pytest.raises(TaskDataError, match="missing key.*y_test"):
        load_task(str(tmp_path / "m.npz"))


@pytest.mark.parametrize(
    "key,value,pattern",
    [
        (
            "x_train",
            np.zeros(60),
            r"x_train must have shape \(n_samples, n_features\); got shape \(60,\)",
        ),
        ("y_train", np.zeros(59, dtype=int), r"y_train must have shape \(60,\).*got shape \(59,\)"),
        ("y_test", np.zeros((20, 3)), r"y_test must have shape \(20,\).*one-hot"),
        ("x_test", np.zeros((20, 4)), r"x_test must have shape \(n_test, 5\).*got \(20, 4\)"),
        ("y_train", np.full(60, 0.5), r"y_train holds non-integer"),
    ],
)
def test_npz_wrong_shapes_name_the_key(tmp_path, key, value, pattern):
    arrays = _user_arrays(np.random.default_rng(0))
    arrays[key] = value
    np.savez(tmp_path / "s.npz", **arrays)
    with pytest.raises(TaskDataError, match=pattern):
        load_task(str(tmp_path / "s.npz"))


def test_npz_nan_is_refused(tmp_path):
    arrays = _user_arrays(np.random.default_rng(0))
    arrays["x_test"][4, 2] = np.nan
    np.savez(tmp_path / "n.npz", **arrays)
    with pytest.raises(TaskDataError, match=r"x_test has 1 non-finite.*row 4"):
        load_task(str(tmp_path / "n.npz"))


def test_npz_unseen_test_label_and_missing_file(tmp_path):
    arrays = _user_arrays(np.random.default_rng(0))
    arrays["y_test"][0] = 42
    np.savez(tmp_path / "u.npz", **arrays)
    with pytest.raises(TaskDataError, match=r"y_test has labels absent from y_train: \[42\]"):
        load_task(str(tmp_path / "u.npz"))
    with pytest.raises(FileNotFoundError, match="nothere.npz"):
        load_task(str(tmp_path / "nothere.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(TaskDataError, match="junk.npz"):
        load_task(str(tmp_path / "junk.npz"))


def test_array_tuple_input():
    rng = np.random.default_rng(2)
    x_train = rng.normal(size=(40, 2, 3))  # images are flattened
    y_train = np.arange(40) % 4
    x_test, y_test = rng.normal(size=(8, 2, 3)), np.arange(8) % 4
    t = load_task((x_train, y_train.tolist(), x_test, y_test))
    assert t.name == "arrays" and t.n_features == 6 and t.n_classes == 4
    assert (len(t.y_train), len(t.y_val), len(t.y_test)) == (32, 8, 8)
    assert np.array_equal(t.x_test, x_test.reshape(8, 6))
    assert load_task(t) is t
    with pytest.raises(TaskDataError, match="length 3"):
        load_task((x_train, y_train, x_test))


def test_tiny_class_falls_back_to_unstratified_split():
    rng = np.random.default_rng(3)
    y_train = np.array([0] * 10 + [1] * 9 + [2])  # class 2 has one sample: cannot stratify
    t = load_task(
        (rng.normal(size=(20, 3)), y_train, rng.normal(size=(4, 3)), np.array([0, 1, 2, 0]))
    )
    assert len(t.y_train) + len(t.y_val) == 20 and len(t.y_val) == 4


# ---------------------------------------------------------------------------------------------
# IDX reader (fixtures written here, in tmp_path)
# ---------------------------------------------------------------------------------------------

_IDX_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}


def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> Path:
    """Write ``arr`` as an IDX file (big-endian), gzipped if asked."""
    arr = np.asarray(arr)
    header = bytes([0, 0, _IDX_CODES[arr.dtype], arr.ndim]) + struct.pack(
        f">{arr.ndim}I", *arr.shape
    )
    payload = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_images_and_labels(tmp_path, gz):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5) * 3
    labels = np.array([2, 0, 9], dtype=np.uint8)
    suffix = ".gz" if gz else ""
    got_x = read_idx(write_idx(tmp_path / f"img{suffix}", images, gz))
    got_y = read_idx(write_idx(tmp_path / f"lab{suffix}", labels, gz))
    assert got_x.shape == (3, 4, 5) and got_x.dtype == np.uint8
    assert np.array_equal(got_x, images) and np.array_equal(got_y, labels)


def test_read_idx_multibyte_types_are_big_endian(tmp_path):
    for arr in (
        np.array([[1, -2], [300, -30000]], dtype=np.int16),
        np.array([1.5, -2.25, 1e30], dtype=np.float32),
        np.array([70000, -1], dtype=np.int32),
    ):
        got = read_idx(write_idx(tmp_path / "a", arr))
        assert got.dtype == arr.dtype and np.array_equal(got, arr)
        raw = (tmp_path / "a").read_bytes()
        assert raw[4 + 4 * arr.ndim :] == arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def test_read_idx_corrupt_files(tmp_path):
    good = write_idx(tmp_path / "good", np.zeros((3, 4, 5), dtype=np.uint8)).read_bytes()
    cases = {
        "magic": (b"\x01\x00" + good[2:], "bad IDX magic number 0x01000803"),
        "type": (good[:2] + b"\x07" + good[3:], "bad IDX magic number"),
        "short": (good[:2], "too short"),
        "header": (good[:8], "truncated IDX header"),
        "truncated": (good[:-1], "truncated"),
        "trailing": (good + b"\x00", "trailing bytes"),
        "gzip": (gzip.compress(good)[:-12], "corrupt gzip"),
    }
    for name, (raw, pattern) in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(IDXFormatError, match=pattern):
            read_idx(tmp_path / name)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST lookup
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_system_data(monkeypatch, tmp_path):
    monkeypatch.delenv(idx.DATA_ENV, raising=False)
    monkeypatch.setattr(idx, "SYSTEM_FASHION_MNIST_DIRS", (tmp_path / "system-none",))


def _write_fashion(folder: Path, n_train=60, n_test=20, gz_train=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = idx.FASHION_FILES
    write_idx(
        folder / (files["x_train"] + (".gz" if gz_train else "")),
        rng.integers(0, 256, size=(n_train, 4, 5), dtype=np.uint8),
        gz_train,
    )
    write_idx(
        folder / (files["y_train"] + (".gz" if gz_train else "")),
        (np.arange(n_train) % 10).astype(np.uint8),
        gz_train,
    )
    write_idx(folder / files["x_test"], rng.integers(0, 256, size=(n_test, 4, 5), dtype=np.uint8))
    write_idx(folder / files["y_test"], (np.arange(n_test) % 10).astype(np.uint8))


def test_fashion_mnist_absent_says_how_to_install(no_system_data, tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_task("fashion-mnist")
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "BLACKBOX_SAT_DATA" in msg and "/usr/share/datasets/fashion-mnist" in msg
    assert "system-none" in msg  # says where it looked


def test_fashion_mnist_partial_folder_names_missing_files(no_system_data, monkeypatch, tmp_path):
    _write_fashion(tmp_path / "data")
    (tmp_path / "data" / (idx.FASHION_FILES["y_test"])).unlink()
    monkeypatch.setenv(idx.DATA_ENV, str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError, match="missing t10k-labels-idx1-ubyte"):
        load_task("fashion_mnist")


def test_fashion_mnist_from_env_subfolder(no_system_data, monkeypatch, tmp_path):
    _write_fashion(tmp_path / "data" / "fashion-mnist")
    monkeypatch.setenv(idx.DATA_ENV, str(tmp_path / "data"))
    t = load_task("fashion-mnist")
    assert t.name == "fashion-mnist" and t.n_classes == 10 and t.n_features == 20
    assert (len(t.y_train), len(t.y_val), len(t.y_test)) == (48, 12, 20)  # val: a fifth when < 5000
    assert t.x_train.dtype == np.float64 and t.x_train.max() <= 255
    assert np.array_equal(t.y_test, np.arange(20) % 10)
    monkeypatch.setattr(tasks, "FASHION_N_VAL", 10)  # the 5000 cap, scaled down
    t = load_task("fashion-mnist")
    assert (len(t.y_train), len(t.y_val)) == (50, 10) and np.all(np.bincount(t.y_val) == 1)


def test_fashion_mnist_data_dir_and_system_dir(no_system_data, monkeypatch, tmp_path):
    _write_fashion(tmp_path / "explicit", gz_train=False)
    assert len(load_task("fashion-mnist", data_dir=tmp_path / "explicit").y_test) == 20
    _write_fashion(tmp_path / "sys", n_test=30)
    monkeypatch.setattr(idx, "SYSTEM_FASHION_MNIST_DIRS", (tmp_path / "sys",))
    assert len(load_task("fashion-mnist").y_test) == 30


def test_fashion_mnist_mismatched_counts(no_system_data, tmp_path):
    _write_fashion(tmp_path / "d")
    write_idx(tmp_path / "d" / idx.FASHION_FILES["y_test"], np.zeros(19, dtype=np.uint8))
    with pytest.raises(IDXFormatError, match="test files disagree"):
        load_task("fashion-mnist", data_dir=tmp_path / "d")


@pytest.mark.skipif(
    not all(idx.find_idx(idx.DEBIAN_FASHION_MNIST_DIR, b) for b in idx.FASHION_FILES.values()),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_fashion_mnist_debian_package(monkeypatch):
    monkeypatch.delenv(idx.DATA_ENV, raising=False)
    t = load_task("fashion-mnist")
    assert (len(t.y_train), len(t.y_val), len(t.y_test)) == (55000, 5000, 10000)
    assert t.n_features == 784 and np.all(np.bincount(t.y_val) == 500)
