import numpy as np
import pytest
import torch

from pipeline.config import Augment, Data
from pipeline.data import (
    DataError,
    augment,
    batches,
    load_meta,
    load_split,
    prepare,
    split_indices,
    stratified_subset,
)

from .conftest import write_idx


def test_prepare_fashion_mnist_idx(idx_dir, tmp_path):
    out = tmp_path / "prepared"
    meta = prepare(Data(root=str(idx_dir), val_fraction=0.2), seed=0, out_dir=out)
    assert meta["sizes"] == {"train": 160, "val": 40, "test": 50}
    assert meta["in_chans"] == 1 and meta["num_classes"] == 10 and len(meta["classes"]) == 10
    train = load_split(out, "train")
    assert train.images.dtype == np.uint8 and train.images.shape == (160, 1, 28, 28)
    assert isinstance(train.images, np.memmap), "prepared images must be read memory-mapped"
    assert load_meta(out) == meta


def test_split_is_seeded_disjoint_and_complete():
    a_train, a_val = split_indices(1000, 0.1, seed=3)
    b_train, b_val = split_indices(1000, 0.1, seed=3)
    c_train, _ = split_indices(1000, 0.1, seed=4)
    assert np.array_equal(a_train, b_train) and np.array_equal(a_val, b_val)
    assert not np.array_equal(a_train, c_train)
    assert len(a_val) == 100 and not set(a_train) & set(a_val)
    assert sorted(np.concatenate([a_train, a_val])) == list(range(1000))


def test_resize_and_limit(idx_dir, tmp_path):
    meta = prepare(Data(root=str(idx_dir), image_size=16, limit=100, test_limit=10), seed=0, out_dir=tmp_path / "p")
    assert meta["sizes"]["train"] + meta["sizes"]["val"] == 100 and meta["sizes"]["test"] == 10
    assert load_split(tmp_path / "p", "test").images.shape[-2:] == (16, 16)


def test_stratified_subset_is_proportional_seeded_and_keeps_every_class():
    labels = np.repeat(np.arange(5), [500, 250, 150, 90, 10])
    rows = stratified_subset(labels, 100, seed=0)
    assert len(rows) == 100 and len(set(rows.tolist())) == 100 and np.all(np.diff(rows) > 0)
    counts = np.bincount(labels[rows], minlength=5)
    assert counts.tolist() == [50, 25, 15, 9, 1]
    assert np.array_equal(rows, stratified_subset(labels, 100, seed=0))
    assert not np.array_equal(rows, stratified_subset(labels, 100, seed=1))
    few = np.bincount(labels[stratified_subset(labels, 7, seed=0)], minlength=5)
    assert few.sum() == 7 and few.min() >= 1, "a limit >= the number of classes keeps every class"
    assert np.bincount(labels[stratified_subset(labels, 3, seed=0)], minlength=5).sum() == 3
    assert np.array_equal(stratified_subset(labels, 0, seed=0), np.arange(1000))
    assert np.array_equal(stratified_subset(labels, 5000, seed=0), np.arange(1000))


def test_limit_keeps_every_class_of_a_class_sorted_dataset(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "sorted"
    root.mkdir()
    for prefix, n in (("train", 200), ("t10k", 100)):
        labels = np.repeat(np.arange(10), n // 10)  # sorted by class, as an ImageFolder listing is
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    out = tmp_path / "p"
    meta = prepare(Data(root=str(root), limit=50, test_limit=20), seed=0, out_dir=out)
    assert meta["sizes"] == {"train": 45, "val": 5, "test": 20}
    pool = np.concatenate([load_split(out, s).labels for s in ("train", "val")])
    assert np.bincount(pool, minlength=10).tolist() == [5] * 10
    assert np.bincount(load_split(out, "test").labels, minlength=10).tolist() == [2] * 10


def test_missing_data_says_three_ways(tmp_path):
    with pytest.raises(DataError) as err:
        prepare(Data(root=str(tmp_path / "nothing")), seed=0, out_dir=tmp_path / "p")
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message and "data.root" in message
    assert "data.download=true" in message


def test_failed_prepare_keeps_previous_output(idx_dir, tmp_path):
    out = tmp_path / "p"
    prepare(Data(root=str(idx_dir)), seed=0, out_dir=out)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(DataError):
        prepare(Data(root=str(tmp_path / "nothing")), seed=0, out_dir=out)
    assert sorted(p.name for p in out.iterdir()) == before


def test_image_folder_any_size(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            for i in range(6):
                size = (20 + i, 30)
                Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(
                    tmp_path / "imgs" / split / cls / f"{i}.png")
    meta = prepare(Data(name="imagefolder", root=str(tmp_path / "imgs"), image_size=24, val_fraction=0.25),
                   seed=0, out_dir=tmp_path / "p")
    assert meta["classes"] == ["cat", "dog"] and meta["in_chans"] == 3
    assert load_split(tmp_path / "p", "train").images.shape == (9, 3, 24, 24)


def test_augment_is_seeded_and_shape_preserving():
    x = torch.randn(8, 1, 28, 28)
    cfg = Augment(hflip=True, pad_crop=2, erase_prob=0.5)
    a = augment(x, cfg, torch.Generator().manual_seed(1))
    b = augment(x, cfg, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)


def test_batches_shard_across_ranks(idx_dir, tmp_path):
    prepare(Data(root=str(idx_dir)), seed=0, out_dir=tmp_path / "p")
    split, meta = load_split(tmp_path / "p", "train"), load_meta(tmp_path / "p")
    seen = [torch.cat([y for _, y in batches(split, meta, 16, torch.device("cpu"), shuffle=True, rank=r, world=2)])
            for r in (0, 1)]
    assert len(seen[0]) + len(seen[1]) == len(split.labels)
    x, _ = next(batches(split, meta, 16, torch.device("cpu")))
    assert abs(float(x.mean())) < 1.0 and x.dtype == torch.float32


def test_augment_leaves_its_input_alone():
    x = torch.randn(4, 1, 8, 8)
    before = x.clone()
    augment(x, Augment(hflip=False, pad_crop=0, erase_prob=1.0), torch.Generator().manual_seed(0))
    assert torch.equal(x, before)


def test_loader_workers_give_the_same_batches(idx_dir, tmp_path):
    """runtime.workers only moves the reads onto reader threads: same images, order and augmentation draws."""
    prepare(Data(root=str(idx_dir)), seed=0, out_dir=tmp_path / "p")
    split, meta = load_split(tmp_path / "p", "train"), load_meta(tmp_path / "p")
    aug = Augment(hflip=True, pad_crop=2, erase_prob=0.5)
    runs = [list(batches(split, meta, 7, torch.device("cpu"), shuffle=True, seed=3, epoch=1, augment_cfg=aug,
                         workers=w)) for w in (0, 2)]
    assert len(runs[0]) == len(runs[1]) == -(-len(split.labels) // 7) > 2
    for (x0, y0), (x2, y2) in zip(*runs, strict=True):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    in_order = torch.cat([y for _, y in batches(split, meta, 5, torch.device("cpu"), workers=2)])
    assert torch.equal(in_order, torch.from_numpy(split.labels))


def test_fit_with_loader_workers_trains_the_same_model(idx_dir, tmp_path):
    """The training loop (teacher, retrain, ranking units) reads through reader threads to the same weights."""
    from pipeline.config import Recipe
    from pipeline.runtime import Loop
    from pipeline.train import fit

    prepare(Data(root=str(idx_dir)), seed=0, out_dir=tmp_path / "p")
    train, val, meta = load_split(tmp_path / "p", "train"), load_split(tmp_path / "p", "val"), load_meta(tmp_path / "p")
    recipe = Recipe(epochs=2, batch_size=8, eval_batch_size=16, warmup_epochs=0)
    states = []
    for workers in (0, 2):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                    torch.nn.Flatten(), torch.nn.Linear(4, 10))
        loop = Loop(torch.device("cpu"), seed=0, channels_last=False, progress=False, workers=workers)
        states.append(fit(model, train, val, meta, recipe, loop, tmp_path / f"ckpt{workers}.pt").state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
