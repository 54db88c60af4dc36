"""Feature cache: exact round trip, views, resume, corruption errors, memory bound, and the stage itself."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.checkpoint import ArtifactError
from pipeline.config import Augment, ConfigError, as_dict, load_params
from pipeline.data import Split, augment, normalize
from pipeline.features import MANIFEST, REBUILD, FeatureCache, write_features

META = {"mean": [0.5], "std": [0.25]}
BLOCKS = ["b0", "b1", "b2"]
REPO = Path(__file__).resolve().parents[1]


class TinyTeacher(torch.nn.Module):
    """Three conv stages standing in for a timm teacher cut at its feature stages."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stages = torch.nn.ModuleList([torch.nn.Conv2d(1, 4, 3, 2, 1), torch.nn.Conv2d(4, 8, 3, 2, 1),
                                           torch.nn.Conv2d(8, 8, 3, 1, 1)])
        self.calls = 0

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.calls += 1
        outs = []
        for stage in self.stages:
            x = torch.relu(stage(x))
            outs.append(x)
        return outs


def _splits(n_train: int = 40, n_val: int = 12) -> dict[str, Split]:
    rng = np.random.default_rng(0)
    return {s: Split(rng.integers(0, 256, (n, 1, 12, 12), dtype=np.uint8), rng.integers(0, 10, n))
            for s, n in (("train", n_train), ("val", n_val))}


def _norm(u8: torch.Tensor) -> torch.Tensor:
    return normalize(u8, META)


def _aug(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return augment(x, Augment(hflip=True, pad_crop=2, erase_prob=0.5), g)


def _write(out: Path, teacher: TinyTeacher | None = None, **kw) -> dict:
    """The synthetic splits through ``teacher``: batches of 8, an fsync every 16 samples, float32 by default."""
    kw = {"batch_size": 8, "chunk_size": 16, "dtype": "float32", "teacher_sha256": "t" * 64, "show_progress": False,
          **kw}
    return write_features(out, _splits(), teacher or TinyTeacher().eval(), BLOCKS, _norm, augment=_aug, **kw)


def _checksums(root: Path) -> dict[str, str]:
    m = json.loads((root / MANIFEST).read_text())
    return {f"{s}/{k}": e["sha256"] for s, v in m["splits"].items() for k, e in v["files"].items()}


@pytest.fixture(scope="module")
def cache32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("c32") / "features"
    _write(out)
    return out


def test_round_trip_is_exact_for_float32_and_random_batches(cache32: Path) -> None:
    cache, splits, teacher = FeatureCache(cache32), _splits(), TinyTeacher().eval()
    assert cache.keys == ["input", *BLOCKS]
    assert cache.num_samples("train") == 40 and cache.num_samples("val") == 12
    assert cache.shape("input") == (1, 12, 12) and cache.shape("b1") == (8, 3, 3)
    for split, index in (("train", np.array([39, 3, 17, 3, 0])), ("val", slice(2, 9))):
        x = _norm(torch.from_numpy(splits[split].images[index]))
        with torch.no_grad():
            want = dict(zip(cache.keys, [x, *teacher(x)], strict=True))
        for key in cache.keys:
            got = cache.get(split, key, index)
            assert got.dtype == torch.float32
            assert torch.equal(got, want[key]), (split, key)
        np.testing.assert_array_equal(cache.labels(split), splits[split].labels)


def test_float16_is_close_and_half_the_size(cache32: Path, tmp_path: Path) -> None:
    _write(tmp_path / "f16", dtype="float16")
    c16, c32 = FeatureCache(tmp_path / "f16"), FeatureCache(cache32)
    idx = np.arange(40)
    for key in c32.keys:
        ref = c32.get("train", key, idx)
        torch.testing.assert_close(c16.get("train", key, idx), ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))
    size = {p: (p / "train" / "b0.npy").stat().st_size for p in (cache32, tmp_path / "f16")}
    assert size[tmp_path / "f16"] < 0.52 * size[cache32]


def test_views_are_plain_then_seeded_augmentations(tmp_path: Path) -> None:
    _write(tmp_path / "a", views=3)
    cache, plain = FeatureCache(tmp_path / "a"), _splits()
    n = 40
    assert cache.num_samples("train") == 3 * n and cache.views("train") == 3
    assert cache.num_samples("val") == 12 and cache.views("val") == 1
    x = cache.get("train", "input", slice(None)).view(3, n, 1, 12, 12)
    assert torch.equal(x[0], _norm(torch.from_numpy(plain["train"].images)))
    assert not torch.equal(x[1], x[0]) and not torch.equal(x[2], x[1])
    np.testing.assert_array_equal(cache.labels("train"), np.tile(plain["train"].labels, 3))
    # each stored target is the teacher's output for the stored (augmented) input
    with torch.no_grad():
        torch.testing.assert_close(cache.get("train", "b2", slice(n, 2 * n)), TinyTeacher().eval()(x[1])[2])
    _write(tmp_path / "b", views=3)
    assert _checksums(tmp_path / "a") == _checksums(tmp_path / "b")  # same seed, same bytes
    _write(tmp_path / "c", views=3, seed=1)
    assert _checksums(tmp_path / "c")["train/input"] != _checksums(tmp_path / "a")["train/input"]


class Killed(Exception):
    pass


class DyingTeacher(TinyTeacher):
    """Killed on its n-th forward, like a stage interrupted mid-write."""

    def __init__(self, dies_at: int) -> None:
        super().__init__()
        self.dies_at = dies_at

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.calls + 1 == self.dies_at:
            raise Killed
        return super().forward(x)


def test_interrupted_write_resumes_from_last_chunk_and_matches(cache32: Path, tmp_path: Path) -> None:
    out = tmp_path / "features"
    with pytest.raises(Killed):  # the shape probe plus three batches ran: one chunk (16 samples) is on disk
        _write(out, teacher=DyingTeacher(dies_at=5).eval())
    assert not out.exists() and (tmp_path / "features.partial").is_dir()
    teacher = TinyTeacher().eval()
    _write(out, teacher=teacher)
    assert teacher.calls == 1 + (40 - 16) // 8 + 12 // 8 + 1  # probe + the rest of train + all of val
    assert _checksums(out) == _checksums(cache32)
    assert not (tmp_path / "features.partial").exists()


def test_settings_changed_since_interruption_start_afresh(tmp_path: Path) -> None:
    out = tmp_path / "features"
    with pytest.raises(Killed):
        _write(out, teacher=DyingTeacher(dies_at=5).eval())
    teacher = TinyTeacher().eval()
    _write(out, teacher=teacher, dtype="float16")  # another dtype: the partial float32 work is discarded
    assert teacher.calls == 1 + 40 // 8 + 12 // 8 + 1
    assert FeatureCache(out).manifest["dtype"] == "float16"


def test_failed_build_keeps_the_previous_cache(cache32: Path, tmp_path: Path) -> None:
    out = tmp_path / "features"
    shutil.copytree(cache32, out)
    loud = TinyTeacher().eval()
    with torch.no_grad():
        loud.stages[2].bias.fill_(1e6)
    with pytest.raises(ConfigError, match="use cache.dtype=float32"):
        _write(out, teacher=loud, dtype="float16")
    with torch.no_grad():
        loud.stages[2].bias.fill_(float("nan"))
    with pytest.raises(ArtifactError, match="dvc repro teacher"):
        _write(out, teacher=loud)
    assert _checksums(out) == _checksums(cache32)
    FeatureCache(out)


@pytest.mark.parametrize("override, key", [("cache.dtype=float64", "cache.dtype"), ("cache.views=0", "cache.views"),
                                           ("cache.chunk_size=0", "cache.chunk_size")])
def test_bad_cache_params_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_params([override], root=REPO)


def _truncate(root: Path) -> Path:
    path = root / "train" / "b1.npy"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    return path


def _flip(root: Path) -> Path:
    path = root / "val" / "b0.npy"
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size - 7)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    return path


def _delete_manifest(root: Path) -> Path:
    (root / MANIFEST).unlink()
    return root / MANIFEST


def _garble_manifest(root: Path) -> Path:
    (root / MANIFEST).write_text('{"format": 1, "splits": ')
    return root / MANIFEST


def _delete_file(root: Path) -> Path:
    (root / "train" / "labels.npy").unlink()
    return root / "train" / "labels.npy"


def _other_teacher(root: Path) -> Path:
    (root.parent / "teacher").mkdir()
    (root.parent / "teacher" / "model.safetensors").write_bytes(b"other weights")
    return root / MANIFEST


def _bad_header(root: Path) -> Path:
    path = root / "train" / "input.npy"
    with open(path, "r+b") as f:
        f.write(b"garbage!")
    return path


@pytest.mark.parametrize("damage", [_truncate, _flip, _delete_manifest, _garble_manifest, _delete_file,
                                    _other_teacher, _bad_header])
def test_damaged_cache_names_file_and_rebuild_command(cache32: Path, tmp_path: Path, damage) -> None:
    root = tmp_path / "features"
    shutil.copytree(cache32, root)
    path = damage(root)
    with pytest.raises(ArtifactError) as err:
        FeatureCache(root)
    message = str(err.value)
    assert str(path) in message and f"`{REBUILD}`" in message and "\n" not in message


def test_matching_teacher_hash_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "teacher").mkdir()
    weights = tmp_path / "teacher" / "model.safetensors"
    weights.write_bytes(b"the teacher")
    _write(tmp_path / "features", teacher_sha256=hashlib.sha256(b"the teacher").hexdigest())
    assert FeatureCache(tmp_path / "features").num_samples("train") == 40


def test_unknown_split_or_key_lists_the_valid_ones(cache32: Path) -> None:
    cache = FeatureCache(cache32, verify=False)
    with pytest.raises(KeyError, match="input, b0, b1, b2"):
        cache.get("train", "b9", slice(0, 2))
    with pytest.raises(KeyError, match="train, val"):
        cache.get("test", "b0", slice(0, 2))


_BOUNDED = textwrap.dedent("""
    import re, resource, sys
    from pathlib import Path
    import numpy as np, torch
    from pipeline.data import Split
    from pipeline.features import FeatureCache, write_features

    torch.ones(64, 64) @ torch.ones(64, 64)  # start torch's thread pool before the cap
    def vm_data():
        return int(re.search(r"VmData:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
    cap = 128 << 20
    limit = vm_data() + cap
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))  # private memory; file mappings are not counted

    out, n = Path(sys.argv[1]), 1200
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 1, 32, 32), dtype=np.uint8)
    norm = lambda u8: u8.float() / 255
    wide = lambda x: [x.repeat(1, 64, 1, 1)]  # 256 KiB per sample: 300 MiB, 2.3x the cap
    write_features(out, {"train": Split(images, np.arange(n))}, wide, ["b0"], norm, batch_size=32,
                   chunk_size=256, dtype="float32", show_progress=False)
    size = (out / "train" / "b0.npy").stat().st_size
    assert size > 2 * cap, size
    cache = FeatureCache(out)
    order = np.random.default_rng(1).permutation(n)
    for start in range(0, n, 32):
        idx = order[start:start + 32]
        assert torch.equal(cache.get("train", "b0", idx), norm(torch.from_numpy(images[idx])).repeat(1, 64, 1, 1))
    try:
        np.load(out / "train" / "b0.npy")
    except MemoryError:
        print("bounded", size)
""")


def test_cache_larger_than_allowed_memory_is_written_and_read(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _BOUNDED, str(tmp_path / "features")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the last line proves the cap was real: loading the file whole failed under it
    assert proc.stdout.split()[0] == "bounded" and int(proc.stdout.split()[1]) > 300 << 20


def _stage():
    spec = importlib.util.spec_from_file_location("stage_cache_features", REPO / "stages" / "cache_features.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stage_caches_a_real_timm_teacher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.teacher import block_outputs, create_teacher, cut_blocks, save_teacher

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = load_params(["runtime.progress=false", "runtime.device=cpu", "cache.batch_size=16"], root=tmp_path)
    prepared = tmp_path / "data" / "prepared"
    prepared.mkdir(parents=True)
    splits = _splits(24, 8)
    meta = {"in_chans": 1, "num_classes": 10, "image_size": 12, **META}
    (prepared / "meta.json").write_text(json.dumps(meta))
    for s, split in splits.items():
        np.save(prepared / f"{s}_images.npy", split.images)
        np.save(prepared / f"{s}_labels.npy", split.labels)
    model = create_teacher(params.teacher, 1, 10).eval()
    blocks = {"teacher": params.teacher.name, "config": as_dict(params.teacher), "image_size": 12, "in_chans": 1,
              "num_classes": 10, "blocks": cut_blocks(model, params.teacher.boundaries, 1, 12)}
    save_teacher(model, blocks, tmp_path / "artifacts" / "teacher")

    _stage().run(params)

    cache = FeatureCache(tmp_path / "artifacts" / "features")
    assert cache.keys == ["input"] + [b["name"] for b in blocks["blocks"]]
    x = normalize(torch.from_numpy(splits["val"].images[[5, 1]]), meta)
    with torch.no_grad():
        want = block_outputs(model, blocks, x)
    for key, ref in zip(cache.keys[1:], want, strict=True):
        torch.testing.assert_close(cache.get("val", key, np.array([5, 1])), ref, rtol=2e-3,
                                   atol=2e-3 * float(ref.abs().max()))
    import mlflow

    runs = mlflow.search_runs(experiment_names=["dna"], output_format="list")
    assert [r.info.run_name for r in runs] == ["cache_features"]
    assert runs[0].data.metrics["cache/bytes"] > 0 and runs[0].data.metrics["cache/write_mb_s"] > 0


def test_stage_without_teacher_exits_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    from pipeline import cli

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    prepared = tmp_path / "data" / "prepared"
    prepared.mkdir(parents=True)
    (prepared / "meta.json").write_text(json.dumps(META))
    for s in ("train", "val"):
        np.save(prepared / f"{s}_images.npy", np.zeros((2, 1, 4, 4), np.uint8))
        np.save(prepared / f"{s}_labels.npy", np.zeros(2, np.int64))
    with pytest.raises(SystemExit) as exit_:
        cli.main(_stage().run, ["runtime.device=cpu"])
    assert exit_.value.code != 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"error: {tmp_path / 'artifacts' / 'teacher'} has no trained teacher: run `dvc repro teacher`"
