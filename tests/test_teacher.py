import json

import pytest
import torch

from pipeline.checkpoint import ArtifactError
from pipeline.config import Teacher
from pipeline.teacher import (
    TeacherError,
    block_outputs,
    create_teacher,
    cut_blocks,
    load_teacher,
    load_weights,
    save_teacher,
)


def small_resnet() -> Teacher:
    return Teacher(name="resnet18", kwargs={"channels": [8, 16, 16, 32], "stem_width": 8}, stem_pool=False,
                   boundaries=[1, 2, 3, 4])


def test_resnet_split_channels_strides_sizes():
    cfg = small_resnet()
    model = create_teacher(cfg, in_chans=1, num_classes=10)
    blocks = cut_blocks(model, cfg.boundaries, in_chans=1, image_size=28)
    assert [b["out_channels"] for b in blocks] == [8, 16, 16, 32]
    assert [b["in_channels"] for b in blocks] == [1, 8, 16, 16]
    assert [b["out_size"] for b in blocks] == [[14, 14], [7, 7], [4, 4], [2, 2]]
    assert [b["stride"] for b in blocks] == [2, 2, 2, 2]
    assert blocks[0]["modules"][:2] == ["conv1", "bn1"] and blocks[1]["modules"] == ["layer2"]


def test_mobilenet_split_and_outputs_match_timm_features():
    import timm

    cfg = Teacher(name="mobilenetv3_small_050", boundaries=[1, 2, 3, 4])
    model = create_teacher(cfg, in_chans=3, num_classes=10).eval()
    blocks = cut_blocks(model, cfg.boundaries, in_chans=3, image_size=64)
    assert len(blocks) == 4
    assert all(b["modules"] and all(m.startswith(("conv_stem", "bn1", "blocks.")) for m in b["modules"])
               for b in blocks)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = block_outputs(model, {"blocks": blocks}, x)
        ref = timm.create_model("mobilenetv3_small_050", in_chans=3, num_classes=10, features_only=True,
                                out_indices=cfg.boundaries)
        ref.load_state_dict(model.state_dict(), strict=False)
        theirs = ref.eval()(x)
    for a, b, meta in zip(ours, theirs, blocks, strict=True):
        assert a.shape[1] == meta["out_channels"] and list(a.shape[-2:]) == meta["out_size"]
        assert torch.allclose(a, b, atol=1e-5)


def test_unknown_model_name_suggests():
    with pytest.raises(TeacherError, match="resnet18"):
        create_teacher(Teacher(name="resnet_18"), 1, 10)


def test_boundary_out_of_range_lists_stages():
    cfg = small_resnet()
    model = create_teacher(cfg, 1, 10)
    with pytest.raises(TeacherError, match="layer4"):
        cut_blocks(model, [1, 9], 1, 28)


def test_checkpoint_formats_and_corruption(tmp_path):
    cfg = small_resnet()
    model = create_teacher(cfg, 1, 10)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "w.pt")
    other = create_teacher(cfg, 1, 10)
    load_weights(other, tmp_path / "w.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True))
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(TeacherError, match="corrupt"):
        load_weights(other, tmp_path / "bad.safetensors")
    with pytest.raises(TeacherError, match="does not exist"):
        load_weights(other, tmp_path / "none.pt")


def test_save_and_load_teacher_round_trip(tmp_path):
    cfg = small_resnet()
    model = create_teacher(cfg, 1, 10).eval()
    blocks = cut_blocks(model, cfg.boundaries, 1, 28)
    from pipeline.config import as_dict

    save_teacher(model, {"teacher": cfg.name, "config": as_dict(cfg), "image_size": 28, "in_chans": 1,
                         "num_classes": 10, "blocks": blocks}, tmp_path / "t")
    loaded, blocks_json = load_teacher(tmp_path / "t")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x))
    assert json.loads((tmp_path / "t" / "blocks.json").read_text())["blocks"] == blocks_json["blocks"]
    (tmp_path / "t" / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ArtifactError, match="dvc repro teacher"):
        load_teacher(tmp_path / "t")


def test_resolution_check_names_the_smallest_image_size():
    cfg = Teacher(name="convnext_atto", boundaries=[0, 1, 2, 3])  # stride 4 stem, then 3 x stride 2: 32 px minimum
    model = create_teacher(cfg, in_chans=3, num_classes=10)
    with pytest.raises(TeacherError) as err:
        cut_blocks(model, cfg.boundaries, in_chans=3, image_size=28)
    message = str(err.value)
    assert "\n" not in message and "data.image_size=28" in message and "data.image_size >= 32" in message
    blocks = cut_blocks(model, cfg.boundaries, in_chans=3, image_size=64)
    assert [b["out_size"] for b in blocks] == [[16, 16], [8, 8], [4, 4], [2, 2]]
    assert model.training, "cut_blocks leaves the model's mode as it found it"
