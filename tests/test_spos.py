"""The SPOS baseline and the NASWOT proxy of the ranking check: same space as the student, uniform sampling, matched
compute, BN-recalibrated rating, resume; the proxy is seeded and tells architectures apart."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import runtime, space, spos, student, validation
from pipeline.checkpoint import ArtifactError
from pipeline.data import Split, load_meta, load_split
from pipeline.runtime import Loop
from tests.fakes import teacher_blocks, tiny_params, write_prepared

OVERRIDES = ["validate.spos.epochs=2", "validate.spos.batch_size=16", "validate.spos.bn_samples=32",
             "validate.spos.eval_batch_size=32", "validate.proxy_batch=16"]
CPU = Loop(torch.device("cpu"), seed=0, channels_last=True, progress=False)


@pytest.fixture(scope="module")
def params():
    return tiny_params(OVERRIDES)


@pytest.fixture(scope="module")
def spec(params):
    return space.build_space(params.space, teacher_blocks())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """96 train and 32 val images of 16x16 whose brightness tells the class."""
    out = tmp_path_factory.mktemp("prepared")
    write_prepared(out)
    return load_meta(out), load_split(out, "train"), load_split(out, "val")


def _net(spec, seed: int = 0) -> spos.SposSupernet:
    torch.manual_seed(seed)
    return spos.SposSupernet(spec)


def _every_network(spec):
    return [dict(zip([b.name for b in spec.blocks], c, strict=True))
            for c in itertools.product(*(list(b.candidates()) for b in spec.blocks))]


def _train(net, prepared, params, ckpt: Path, ident=None, on_epoch=None):
    meta, train, _ = prepared
    return spos.train(net, train, meta, params.validate.spos, 3, CPU, ckpt, ident or {"test": 1}, on_epoch)


def test_a_path_is_the_timm_student_of_its_choice(spec, prepared):
    """Stem, the chosen layers, head and classifier: the same parameters and FLOPs as the timm student."""
    meta, _, _ = prepared
    net, rng = _net(spec), np.random.default_rng(0)
    shape = (1, *teacher_blocks()["blocks"][0]["in_size"])
    for choice in [spos.ArchitectureSampler(spec)(rng) for _ in range(4)]:
        timm_student = student.create(student.model_args(spec, choice), meta)
        assert space.module_cost(net.path(choice), shape) == space.module_cost(timm_student, shape), choice
        assert net(torch.zeros(2, *shape), choice).shape == (2, 10)


def test_the_sampler_is_uniform_over_whole_networks(spec):
    sampler, rng = spos.ArchitectureSampler(spec), np.random.default_rng(0)
    draws = [tuple(sampler(rng).values()) for _ in range(8000)]
    networks = _every_network(spec)
    counts = Counter(draws)
    assert set(counts) <= {tuple(n.values()) for n in networks}, "only networks of the space"
    expected = len(draws) / len(networks)  # 50 per network: 160 of them
    assert len(counts) == len(networks) and max(counts.values()) < 2 * expected and min(counts.values()) > expected / 2
    one_layer = sum(c.startswith("d1") for c in (d[1] for d in draws)) / len(draws)
    assert one_layer == pytest.approx(2 / 10, abs=0.02), "block b1's one-layer cell holds 2 of its 10 candidates"


def test_compute_matches_the_dna_supernets(spec, params):
    """Mean MACs per network = the brute-force mean over every network; steps x batch x those = the DNA MACs."""
    brute = np.mean([sum(space.candidate_cost(b, n[b.name]).flops for b in spec.blocks) for n in _every_network(spec)])
    fixed = space.fixed_parts_cost(spec).flops
    compute = spos.match_compute(spec, params.validate.spos, params, 512)
    assert compute.macs_per_image == pytest.approx(brute + fixed)
    cfg, sup = params.validate.spos, params.supernet
    per_block = sum(spos.mean_block_macs(b, student=False) for b in spec.blocks)
    assert compute.dna_macs == pytest.approx(sup.epochs * (min(sup.train_samples, 512) // sup.batch_size)
                                             * sup.batch_size * per_block)
    images = compute.steps * cfg.epochs * cfg.batch_size
    assert compute.ratio(images) == pytest.approx(1.0, abs=cfg.epochs * cfg.batch_size * compute.macs_per_image
                                                  / compute.dna_macs)
    doubled = tiny_params([*OVERRIDES, "validate.spos.compute=2"])
    assert spos.match_compute(spec, doubled.validate.spos, doubled, 512).steps == pytest.approx(2 * compute.steps, abs=1)
    first = spec.blocks[0]
    longer = tiny_params([*OVERRIDES, f"space.blocks.{first.name}.epochs={3 * sup.epochs}"])
    extra = 2 * sup.epochs * (min(sup.train_samples, 512) // sup.batch_size) * sup.batch_size \
        * spos.mean_block_macs(first, student=False)
    assert spos.match_compute(spec, cfg, longer, 512).dna_macs == pytest.approx(compute.dna_macs + extra), \
        "a block trained for its own epochs counts at those epochs"
    fewer = tiny_params([*OVERRIDES, f"space.blocks.{first.name}.train_samples={sup.batch_size}"])  # one batch
    less = sup.epochs * ((min(sup.train_samples, 512) // sup.batch_size) - 1) * sup.batch_size \
        * spos.mean_block_macs(first, student=False)
    assert spos.match_compute(spec, cfg, fewer, 512).dna_macs == pytest.approx(compute.dna_macs - less), \
        "a block trained on its own samples per epoch counts those"


@torch.no_grad()
def _bn_corrupt(net: nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(50.0)
            m.running_var.fill_(1e-4)


def test_training_changes_the_ratings_and_rating_recalibrates_bn(spec, prepared, params, tmp_path):
    meta, train, val = prepared
    choices = {f"a{i}": c for i, c in enumerate(_every_network(spec)[::40])}
    cfg = params.validate.spos
    untrained = spos.rate(_net(spec), choices, train, val, meta, cfg, CPU)
    net = _net(spec)
    history = _train(net, prepared, params, tmp_path / "spos.pt")
    assert [r["epoch"] for r in history] == [1, 2] and all(np.isfinite(r["train/loss"]) for r in history)
    trained = spos.rate(net, choices, train, val, meta, cfg, CPU)
    assert trained != untrained, "the rating reads the trained weights"
    assert all(0 <= r["acc"] <= 1 for r in trained.values())
    _bn_corrupt(net)  # statistics from training are replaced, per candidate, by those of the fixed train batch
    assert spos.rate(net, choices, train, val, meta, cfg, CPU) == trained
    reverse = dict(reversed(list(choices.items())))
    assert spos.rate(net, reverse, train, val, meta, cfg, CPU) == trained, "no candidate's BN leaks into another's"
    without = {name: validation_accuracy(net, choice, val, meta) for name, choice in choices.items()}
    assert without != {n: r["acc"] for n, r in trained.items()}, "corrupt statistics would change them"


def validation_accuracy(net, choice, val, meta) -> float:
    """A rating without recalibration (the corrupt statistics left in place)."""
    from pipeline.train import evaluate

    return evaluate(net.path(choice), val, meta, CPU, 32)["acc"]


def test_a_killed_run_resumes_to_the_uninterrupted_result(spec, prepared, params, tmp_path):
    whole = _net(spec)
    expected = _train(whole, prepared, params, tmp_path / "whole.pt")

    def kill(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(_net(spec), prepared, params, tmp_path / "killed.pt", on_epoch=kill)
    seen: list[int] = []
    resumed = _net(spec)
    history = _train(resumed, prepared, params, tmp_path / "killed.pt", on_epoch=lambda r: seen.append(r["epoch"]))
    assert seen == [2] and history == expected, "only epoch 2 runs again, and it replays the uninterrupted one"
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(),
                                                 strict=True))
    seen.clear()
    _train(_net(spec), prepared, params, tmp_path / "killed.pt", ident={"test": 2}, on_epoch=lambda r: seen.append(
        r["epoch"]))
    assert seen == [1, 2], "a checkpoint made under another identity is not resumed"


def test_a_corrupt_checkpoint_names_the_stage_that_rebuilds_it(spec, prepared, params, tmp_path):
    (tmp_path / "spos.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ArtifactError, match=r"spos\.pt is corrupt.*validate/dvc.yaml:validate_spos"):
        _train(_net(spec), prepared, params, tmp_path / "spos.pt")


def test_the_identity_ignores_rating_settings_only(params):
    compute = spos.Compute(1.0, 1.0, 3)
    base = spos.identity(params, compute, "data")
    assert spos.identity(tiny_params([*OVERRIDES, "validate.spos.bn_samples=8"]), compute, "data") == base
    assert spos.identity(tiny_params([*OVERRIDES, "validate.spos.lr=0.01"]), compute, "data") != base
    assert spos.identity(params, spos.Compute(1.0, 1.0, 4), "data") != base
    assert spos.identity(params, compute, "other data") != base


def _archs(spec, n: int) -> list[validation.Sampled]:
    return [validation.Sampled(f"s{i:02d}", "stratified", tuple(c.values()), 1.0, 1.0, 0.5, (0.5,) * 3)
            for i, c in enumerate(_every_network(spec)[::len(_every_network(spec)) // n][:n])]


def test_naswot_is_seeded_and_tells_architectures_apart(spec, prepared, params):
    meta, train, _ = prepared
    archs = _archs(spec, 4)
    first = validation.zero_cost(archs, params, spec, meta, train, CPU.device)
    assert validation.zero_cost(archs, params, spec, meta, train, CPU.device) == first
    assert len(set(first.values())) == len(archs) and all(np.isfinite(v) for v in first.values())
    other = validation.zero_cost(archs, tiny_params([*OVERRIDES, "seed=1"]), spec, meta, train, CPU.device)
    assert other != first, "the initialisation is the seed's"


def test_naswot_is_the_log_determinant_of_the_papers_kernel():
    """K[i, j] = units where the binary codes of images i and j agree (Mellor et al. 2021), by brute force."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten())
    images = torch.randn(5, 1, 6, 6)
    codes = []
    x = images
    for layer in model:
        if isinstance(layer, nn.ReLU):
            codes.append((x.flatten(1) > 0).float())
        x = layer(x)
    c = torch.cat(codes, 1)
    kernel = (c[:, None, :] == c[None, :, :]).sum(-1).double()
    assert validation.naswot(model, images, nn.ReLU) == pytest.approx(float(torch.logdet(kernel)))


def test_spos_training_and_rating_stay_on_the_loop_device(spec, prepared, params, tmp_path):
    from tests.test_device import META, SameDevice

    meta, train, val = prepared
    loop = Loop(META, seed=0, channels_last=True, progress=False)
    net = runtime.to_device_model(_net(spec), META, True)
    with SameDevice():
        history = spos.train(net, train, meta, params.validate.spos, 2, loop, tmp_path / "meta.pt", {"test": 1})
        rated = spos.rate(net, {"a": _every_network(spec)[0]}, train, Split(val.images[:16], val.labels[:16]), meta,
                          params.validate.spos, loop)
    assert len(history) == 2 and set(rated["a"]) == {"acc", "loss"}
