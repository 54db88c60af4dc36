"""Image folders: mixed formats and sizes, unreadable files, stratified limits, decoding under a memory cap."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import Data
from pipeline.data import DataError, load_meta, load_split, prepare

from .conftest import REPO

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255),
           (255, 0, 255), (128, 128, 128), (255, 255, 255), (64, 32, 16), (16, 200, 90)]


def _image_bytes(colour: tuple[int, int, int], size: tuple[int, int], mode: str, fmt: str) -> bytes:
    """A solid-colour image (converted to ``mode``) encoded as ``fmt``."""
    buf = io.BytesIO()
    Image.new("RGB", size, colour).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def _mixed_folder(root: Path) -> Path:
    """2 classes, each image a different size, mode and format, plus a truncated JPEG and a text file as .png."""
    variants = [("RGB", "PNG", ".png"), ("RGB", "JPEG", ".jpg"), ("L", "PNG", ".png"), ("RGBA", "PNG", ".png"),
                ("P", "PNG", ".png"), ("RGB", "BMP", ".bmp")]
    for split, per_class in (("train", 6), ("test", 3)):
        for c, cls in enumerate(("ant", "bee")):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                mode, fmt, ext = variants[(i + c) % len(variants)]
                data = _image_bytes(COLOURS[c], (10 + 7 * i, 31 - 3 * i), mode, fmt)
                (root / split / cls / f"{i}{ext}").write_bytes(data)
    jpeg = _image_bytes((1, 2, 3), (64, 64), "RGB", "JPEG")
    (root / "train" / "ant" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "test" / "bee" / "notes.png").write_text("not an image\n")
    return root


def test_bad_images_fail_names_the_first_and_keeps_the_previous_output(tmp_path: Path) -> None:
    root = _mixed_folder(tmp_path / "imgs")
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "meta.json").write_text("{}")  # a previous result that must survive
    with pytest.raises(DataError) as err:
        prepare(Data(name="imagefolder", root=str(root), image_size=16), seed=0, out_dir=out)
    message = str(err.value)
    assert "\n" not in message and "2 unreadable images" in message
    assert "train/ant/cut.jpg" in message and "data.bad_images=skip" in message
    assert sorted(p.name for p in out.iterdir()) == ["meta.json"] and (out / "meta.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "prepared"], "no partial output left behind"


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_images_skip_lists_them_and_decodes_the_rest(tmp_path: Path, workers: int) -> None:
    root = _mixed_folder(tmp_path / "imgs")
    out = tmp_path / "prepared"
    meta = prepare(Data(name="imagefolder", root=str(root), image_size=16, val_fraction=0.25, bad_images="skip"),
                   seed=0, out_dir=out, workers=workers)
    assert [s["file"] for s in meta["skipped"]] == ["train/ant/cut.jpg", "test/bee/notes.png"]
    assert meta["sizes"] == {"train": 9, "val": 3, "test": 6} and meta["in_chans"] == 3
    assert load_meta(out) == meta
    for split in ("train", "val", "test"):
        data = load_split(out, split)
        assert data.images.dtype == np.uint8 and data.images.shape[1:] == (3, 16, 16)
        # every image is one solid colour: its class's, whatever its mode and format (JPEG within a few levels)
        expected = np.array(COLOURS)[data.labels][:, :, None, None]
        gray = np.array([[int(round(0.299 * r + 0.587 * g + 0.114 * b))] * 3 for r, g, b in COLOURS])[data.labels]
        diff = np.minimum(np.abs(data.images.astype(int) - expected).max(axis=(2, 3)),
                          np.abs(data.images.astype(int) - gray[:, :, None, None]).max(axis=(2, 3)))
        assert diff.max() <= 3, split


def test_workers_decode_the_same_bytes(tmp_path: Path) -> None:
    root = _mixed_folder(tmp_path / "imgs")
    cfg = Data(name="imagefolder", root=str(root), image_size=12, bad_images="skip")
    prepare(cfg, seed=0, out_dir=tmp_path / "p0", workers=0)
    prepare(cfg, seed=0, out_dir=tmp_path / "p2", workers=2)
    for name in sorted(p.name for p in (tmp_path / "p0").iterdir()):
        assert (tmp_path / "p0" / name).read_bytes() == (tmp_path / "p2" / name).read_bytes(), name


def _class_folder(root: Path, per_class: dict[str, int]) -> Path:
    """``train`` and ``test`` with 10 classes of tiny solid-colour PNGs, written as one encoded file per class."""
    for split, n in per_class.items():
        for c, colour in enumerate(COLOURS):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            data = _image_bytes(colour, (4, 4), "RGB", "PNG")
            for i in range(n):
                (folder / f"{i:05d}.png").write_bytes(data)
    return root


def test_limits_keep_every_class(tmp_path: Path) -> None:
    root = _class_folder(tmp_path / "imgs", {"train": 12, "test": 5})
    cfg = Data(name="imagefolder", root=str(root), image_size=8, limit=40, test_limit=20)
    meta = prepare(cfg, seed=0, out_dir=tmp_path / "a")
    assert meta["sizes"]["test"] == 20 and meta["sizes"]["train"] + meta["sizes"]["val"] == 40
    test = load_split(tmp_path / "a", "test")
    assert np.bincount(test.labels, minlength=10).tolist() == [2] * 10
    pool = np.concatenate([load_split(tmp_path / "a", s).labels for s in ("train", "val")])
    assert np.bincount(pool, minlength=10).tolist() == [4] * 10
    prepare(cfg, seed=0, out_dir=tmp_path / "b")
    prepare(cfg, seed=1, out_dir=tmp_path / "c")
    splits = [json.loads((tmp_path / d / "splits.json").read_text()) for d in "abc"]
    assert splits[0] == splits[1] and splits[0]["train"] != splits[2]["train"]


_CAPPED = textwrap.dedent("""
    import re, resource, sys
    from pathlib import Path
    import numpy as np
    import torchvision.datasets.folder  # imported before the cap, like every other import
    from pipeline.config import Data
    from pipeline.data import prepare

    def vm_size():
        return int(re.search(r"VmSize:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024

    cap = 384 << 20
    limit = vm_size() + cap
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # all address space: heap, stacks and file mappings
    size = int(sys.argv[3])
    meta = prepare(Data(name="imagefolder", root=sys.argv[1], image_size=size), seed=0, out_dir=Path(sys.argv[2]),
                   workers=2)
    decoded = sum(meta["sizes"].values()) * 3 * size * size
    assert decoded > 2 * cap, (decoded, cap)
    try:
        np.ones(decoded, np.uint8)
    except MemoryError:
        print("bounded", decoded, cap)
""")


def test_prepare_of_a_folder_larger_than_the_memory_cap(tmp_path: Path) -> None:
    root = _class_folder(tmp_path / "imgs", {"train": 1800, "test": 200})  # 20k images
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _CAPPED, str(root), str(tmp_path / "p"), "128"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the last line proves the cap was real: one array of the decoded size could not be allocated under it
    words = proc.stdout.split()
    assert words[0] == "bounded" and int(words[1]) > 900 << 20, proc.stdout
    meta = load_meta(tmp_path / "p")
    assert meta["sizes"] == {"train": 16200, "val": 1800, "test": 2000}
    for split in ("train", "val", "test"):
        data = load_split(tmp_path / "p", split)
        assert np.array_equal(data.images[:, :, 64, 64], np.array(COLOURS, np.uint8)[data.labels]), split
    print(f"capped prepare: {time.monotonic() - start:.1f} s")
