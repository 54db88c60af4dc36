import pytest

from pipeline.config import ConfigError, Params, as_dict, block_supernet, load_params, validate
from tests.fakes import REPO


def test_defaults_load_and_match_schema():
    p = load_params(root=REPO)
    assert isinstance(p, Params)
    assert len(p.teacher.boundaries) >= 3, "the default split must have at least 3 blocks"
    assert list(p.space.blocks) == [f"b{i}" for i in range(len(p.teacher.boundaries))]


def test_override_is_applied_and_coerced():
    p = load_params(["teacher.train.epochs=2", "data.limit=500"], root=REPO)
    assert p.teacher.train.epochs == 2 and p.data.limit == 500


@pytest.mark.parametrize("override, words", [
    (["teacher.train.epochs=abc"], ["teacher.train.epochs", "abc"]),
    (["teacher.nosuch=1"], ["teacher.nosuch"]),
    (["+teacher.nosuch=1"], ["nosuch"]),
    (["data.name=mnist"], ["data.name", "mnist", "fashion_mnist"]),
    (["data.val_fraction=1.5"], ["data.val_fraction", "1.5"]),
    (["cache.dtype=int8"], ["cache.dtype", "float16"]),
    (["runtime.device=tpu"], ["runtime.device", "tpu"]),
    (["teacher.boundaries=[3,1]"], ["teacher.boundaries"]),
    (["+space.blocks.b1.epochs=-1"], ["space.blocks.b1.epochs", "-1", ">= 0"]),
    (["space.blocks.b3.train_samples=-5"], ["space.blocks.b3.train_samples", "-5", ">= 0"]),
])
def test_bad_values_name_key_and_fix(override, words):
    with pytest.raises(ConfigError) as err:
        load_params(override, root=REPO)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_block_supernet_takes_a_blocks_own_lr_epochs_and_train_samples():
    p = load_params(["supernet.epochs=7", "supernet.lr=0.01", "supernet.train_samples=500",
                     "+space.blocks.b0.epochs=0", "+space.blocks.b0.lr=0", "+space.blocks.b0.train_samples=0",
                     "+space.blocks.b1.epochs=21", "+space.blocks.b1.lr=0.002", "+space.blocks.b1.train_samples=900"],
                    root=REPO)
    b0 = block_supernet(p, "b0")
    assert (b0.epochs, b0.lr, b0.train_samples) == (7, 0.01, 500), "0 = the supernet's"
    own = block_supernet(p, "b1")
    assert (own.epochs, own.lr, own.train_samples) == (21, 0.002, 900) and own.batch_size == p.supernet.batch_size


def test_the_gpu_ground_truth_overrides_load():
    """README's `dvc exp run` of the ranking check on a GPU must pass validation as written."""
    p = load_params(["validate.train_limit=0", "validate.train.epochs=8", "validate.seeds=2", "validate.workers=6",
                     "runtime.workers=2"], root=REPO)
    assert (p.validate.train_limit, p.validate.train.epochs, p.validate.workers, p.runtime.workers) == (0, 8, 6, 2)


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="params.yaml"):
        load_params(root=tmp_path)


def test_as_dict_round_trips_through_validate():
    p = load_params(root=REPO)
    assert validate(as_dict(p)) == p


OPEN_MAPPINGS = ("teacher.kwargs", "space.blocks", "search.limits")  # free-form: params.yaml is their only source


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in OPEN_MAPPINGS:
            out.update(_leaves(value, name + "."))
        else:
            out[name] = value
    return out


def test_schema_defaults_are_params_yaml():
    """params.yaml is the one source of defaults: a schema default that differs from it, or a key it lacks, fails."""
    from omegaconf import OmegaConf

    schema = _leaves(OmegaConf.to_container(OmegaConf.structured(Params)))
    params = _leaves(OmegaConf.to_container(OmegaConf.load(REPO / "params.yaml")))
    assert sorted(set(schema) ^ set(params)) == [], "keys in one but not the other"
    differ = {k: (schema[k], params[k]) for k in schema if k not in OPEN_MAPPINGS and schema[k] != params[k]}
    assert differ == {}, f"schema default vs params.yaml: {differ}"
    assert all(schema[k] == {} for k in OPEN_MAPPINGS), "open mappings have no schema default"
