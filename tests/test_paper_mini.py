"""The paper setting in miniature, end to end on one CPU core: configs/paper.yaml + configs/paper_mini.yaml.

Every stage of dvc.yaml runs once, in DAG order, in one process (``benchmarks/paper_scale.py``'s ``run_dag``: the
stages' own ``run``, as ``dvc repro`` would start them): ImageFolder PNGs at 64 px, an EfficientNet teacher
(tinynet_e, random weights) cut by module name at blocks.1..blocks.6 as the overlay cuts B7, the teacher online
(no feature cache), SE-MBConv ops, the stem layer, depth and width cells, the flops_dna search under a budget that
binds, retrain, report. The paper overlay's own checks (DNA-a..d, B7's split) are tests/test_paper.py's.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from benchmarks.paper_scale import OVERLAYS, StageTime, make_miniature, run_dag, stage_order
from pipeline import describe, overlay, space, student
from pipeline.config import Params, load_params
from pipeline.features import MANIFEST
from tests.fakes import REPO

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@dataclass
class Mini:
    root: Path
    params: Params
    spec: space.SpaceSpec
    times: list[StageTime]


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> Mini:
    """The miniature's workspace after every stage ran (about 15 s of one core)."""
    root = make_miniature(tmp_path_factory.mktemp("paper_mini") / "ws")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        times = run_dag(root)
    params = load_params(root=root)
    spec = space.build_space(params.space, space.load_teacher_blocks(root / space.TEACHER_BLOCKS))
    print("\n".join(f"{t.stage:15s} {t.cpu_s:6.2f} s CPU {t.wall_s:6.2f} s wall, teacher {t.teacher_s:5.2f} s on "
                    f"{t.teacher_images} images, peak {t.peak_mb:.0f} MB" for t in times))
    return Mini(root, params, spec, times)


def test_the_miniature_is_the_paper_overlay_shrunk(mini, tmp_path):
    p, paper = mini.params, OmegaConf.load(REPO / OVERLAYS[0])
    assert p.teacher.boundaries == list(paper.teacher.boundaries) == [f"blocks.{i}" for i in range(1, 7)]
    assert (p.cache.mode, p.search.metric, p.search.relative, p.space.identity) == ("online", "flops_dna", False, False)
    assert set(p.space.ops) < set(paper.space.ops) and p.space.stem_layer.startswith("ds_r1_k3_s1")
    assert list(p.space.blocks) == list(paper.space.blocks) and p.retrain.train.opt == paper.retrain.train.opt
    assert any(c.out for c in p.space.blocks["b3"].cells), "width cells: the next blocks read either width"
    # `python -m pipeline.overlay` merges the two overlays in order into the same params.yaml
    dest = tmp_path / "cli"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        assert overlay.main([*map(str, OVERLAYS), str(dest)]) == 0
    assert yaml.safe_load((dest / "params.yaml").read_text()) == yaml.safe_load((mini.root / "params.yaml").read_text())


def test_every_dvc_stage_ran_once(mini):
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    expected = {f"{name}@{b}" if "foreach" in body else name for name, body in stages.items()
                for b in (mini.params.space.blocks if "foreach" in body else [None])}
    assert [t.stage for t in mini.times] == [f"{n}@{b}" if b else n for n, b in stage_order(list(mini.params.space.blocks))]
    assert set(t.stage for t in mini.times) == expected and len(expected) == 20
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{mini.root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(mini.params.tracking.experiment).experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(expected), "one MLflow run per stage execution"


def test_the_teacher_ran_online_for_every_block(mini):
    features = mini.root / "artifacts/features"
    assert [p.name for p in features.iterdir()] == [MANIFEST]  # no cache on disk: the paper's path
    assert json.loads((features / MANIFEST).read_text())["decision"]["mode"] == "online"
    sizes = json.loads((mini.root / "data/prepared/meta.json").read_text())["sizes"]
    s, sc = mini.params.supernet, mini.params.score
    by_stage = {t.stage: t.teacher_images for t in mini.times}
    for block in mini.params.space.blocks:  # the online reader's forwards: what the recipe reads, nothing cached
        assert by_stage[f"supernet@{block}"] == s.epochs * (s.train_samples + s.batch_size + s.val_samples)
        rated = min(sc.batches * sc.batch_size, sizes["val"])
        assert by_stage[f"score@{block}"] == sizes["train"] + rated + sc.bn_batch_size  # train moments: whole split
    assert all(n == 0 for stage, n in by_stage.items() if not stage.startswith(("supernet", "score")))


def test_every_block_rates_every_candidate(mini):
    for block in mini.spec.blocks:
        with open(mini.root / mini.params.search.scores_dir / f"{block.name}.csv") as f:
            rows = list(csv.DictReader(f))
        assert [r["candidate"] for r in rows] == list(block.candidates()), block.name
        scores = [float(r["score"]) for r in rows]
        assert all(math.isfinite(v) and v > 0 for v in scores) and len(set(scores)) == len(scores), block.name
    assert any(len(c.layers) != len(mini.spec.blocks[0].cells[0].layers) for c in mini.spec.blocks[0].cells)


def _networks(spec: space.SpaceSpec, tables: dict[str, dict[str, float]]):
    """Every whole network of the space (widths joined) as (summed score, total flops_dna, choice)."""
    fixed = space.fixed_parts_cost(spec).flops_dna
    nets = [(0.0, fixed, {}, spec.stem.layer_out or spec.stem.out_chs)]
    for block in spec.blocks:
        options = [(cid, block.parse(cid)[0]) for cid in block.candidates()]
        nets = [(score + tables[block.name][cid], flops + space.candidate_cost(block, cid).flops_dna,
                 {**choice, block.name: cid}, cell.layers[-1].student_out)
                for score, flops, choice, writes in nets for cid, cell in options if cell.layers[0].student_in == writes]
    return [(score, flops, choice) for score, flops, choice, _ in nets]


def test_the_search_picks_the_best_joined_network_within_the_flops_dna_budget(mini):
    s = mini.params.search
    arch = student.read_architecture(mini.root / s.out_dir / student.ARCHITECTURE)
    choice = student.choice_of(arch, mini.spec, "architecture.json")
    for block in mini.spec.blocks:
        assert choice[block.name] in set(block.candidates()), block.name
    space.check_chain(mini.spec, choice)  # the widths join: the retrain stage built it
    built = describe.architecture_cost(mini.root / s.out_dir / student.ARCHITECTURE, mini.spec)
    assert arch["flops_dna"] == built.flops_dna <= s.budget
    tables = {}
    for block in mini.spec.blocks:
        with open(mini.root / s.scores_dir / f"{block.name}.csv") as f:
            tables[block.name] = {r["candidate"]: float(r["score"]) for r in csv.DictReader(f)}
    nets = _networks(mini.spec, tables)
    assert len(nets) == space.num_architectures(mini.spec)
    assert max(f for _, f, _ in nets) > s.budget > min(f for _, f, _ in nets), "the budget binds"
    best = min(score for score, flops, _ in nets if flops <= s.budget)
    assert arch["score"] == pytest.approx(best, rel=1e-9)


def test_the_student_is_trained_and_reported(mini):
    root = mini.root
    metrics = json.loads((root / "metrics/student.json").read_text())
    arch = json.loads((root / mini.params.search.out_dir / student.ARCHITECTURE).read_text())
    assert 0 <= metrics["val/acc"] <= 1 and 0 <= metrics["test/acc"] <= 1
    assert (metrics["params"], metrics["flops"]) == (arch["params"], arch["flops"])
    with open(root / "plots/student.csv") as f:
        assert len(list(csv.DictReader(f))) == mini.params.retrain.train.epochs
    model = student.load(root / "artifacts/student")
    assert model.num_classes == 4 and model.pretrained_cfg["input_size"] == (3, 64, 64)
    summary = json.loads((root / "metrics/summary.json").read_text())
    assert summary["student"]["params"] == metrics["params"] and summary["teacher"]["test_acc"] >= 0
    report = (root / "reports/report.md").read_text()
    assert "tinynet_e" in report and all((root / "reports" / f).is_file() for f in ("pareto.png", "training.png"))
    assert json.loads((root / "metrics/additivity.json").read_text())["students"] == 0  # skipped, recorded
