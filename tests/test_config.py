import pytest

from promptlearn.cli import dataset_config
from promptlearn.config import load_config, protocol_epochs
from promptlearn.errors import ConfigError


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text("train:\n  lr: 0.01\n  epochs: 7\ncoop:\n  ctx_init: a photo of a\nmethods: [coop]\n")
    cfg = load_config([f], ["train.lr=0.5", "data.shots=4"])
    assert cfg.train.lr == 0.5 and cfg.train.epochs == 7 and cfg.data.shots == 4
    assert cfg.coop.ctx_init == "a photo of a" and cfg.methods == ["coop"]


def test_unknown_key_suggests_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr'; did you mean 'train.lr'"):
        load_config([], ["train.lrr=1"])
    f = tmp_path / "b.yaml"
    f.write_text("coop:\n  nctx: 4\n")
    with pytest.raises(ConfigError, match=r"b.yaml: unknown config key 'coop.nctx'; did you mean 'coop.n_ctx'"):
        load_config([f])


@pytest.mark.parametrize("override, message", [
    ("data.shots=abc", "data.shots must be an integer"),
    ("data.shots=0", "data.shots must be at least 1"),
    ("data.shots=-2", "data.shots must be at least 1"),
    ("coop.n_ctx=0", "coop.n_ctx must be at least 1"),
    ("train.epochs=-1", "train.epochs must be 0 or more"),
    ("coop.class_specific=maybe", "coop.class_specific must be true or false"),
    ("coop.class_position=left", "coop.class_position must be one of end, middle, front"),
    ("data.template=a photo", "must contain {}"),
    ("data.template={}{x}", "exactly one {} and no other braces"),
    ("train.lr=fast", "train.lr must be a number"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], [override])


def test_invalid_yaml_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config([f])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([tmp_path / "missing.yaml"])


def test_protocol_epochs():
    assert [protocol_epochs(k, "oxford_pets") for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert protocol_epochs(16, "imagenet") == 50


def test_dataset_flag_resolves_shipped_yaml():
    files, overrides = dataset_config("oxford_pets")
    assert files and files[0].endswith("configs/datasets/oxford_pets.yaml") and not overrides
    cfg = load_config(files)
    assert cfg.data.name == "oxford_pets" and cfg.data.template == "a photo of a {}, a type of pet."
    assert dataset_config("image_folder") == ([], ["data.name=image_folder"])


def test_every_shipped_run_config_loads():
    from helpers import REPO

    base = REPO / "configs" / "coop" / "rn50.yaml"
    files = sorted((REPO / "configs" / "coop").glob("*.yaml")) + [REPO / "configs" / "quickstart.yaml"]
    assert len(files) >= 12
    for f in files:
        cfg = load_config([base, f])
        assert cfg.backbone.model and cfg.methods, f
