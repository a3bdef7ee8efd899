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
    ("train.min_lr=-1e-6", r"train.min_lr must be 0 or more and at most train.lr \(0.002\), got -1e-06"),
    ("train.min_lr=0.01", r"train.min_lr must be 0 or more and at most train.lr \(0.002\), got 0.01"),
    ("train.max_steps=0", "train.max_steps must be at least 1"),
    ("train.max_steps=1.5", "train.max_steps must be an integer"),
    ("clip_lora.stop=original", "clip_lora.stop must be one of epochs, iterations, got 'original'"),
    ("clap.protocol=reference", r"clap.protocol was removed: .*`recipe: published` applies its authors' recipe"),
    ("lp_pp.protocol=reference", r"lp_pp.protocol was removed: .*promptlearn list recipes lp_pp"),
    ("clap.batches=epochs", "clap.batches must be one of passes, pooled, got 'epochs'"),
    ("lp_pp.templates=[a photo]", r"lp_pp.templates 'a photo' must contain \{\}"),
    ("linear_probe.features=unit", "linear_probe.features must be one of normalised, raw, got 'unit'"),
    ("linear_probe.search=grid", "linear_probe.search must be one of refine, bisection, got 'grid'"),
    ("linear_probe.c_grid=[1, 0]", r"linear_probe.c_grid must hold at least one value, every one positive, got \[1.0, 0.0\]"),
    ("linear_probe.bisection_steps=-1", "linear_probe.bisection_steps must be 0 or more, got -1"),
    ("data.val_shots=0", "data.val_shots must be a whole number of at least 1, or 'shots' for K"),
    ("data.val_shots=-3", "data.val_shots must be a whole number of at least 1, or 'shots' for K"),
    ("data.val_shots=2.5", "data.val_shots must be a whole number of at least 1, or 'shots' for K"),
    ("data.val_shots=all", "data.val_shots must be a whole number of at least 1, or 'shots' for K"),
    # method sections' sizes are range-checked like train.batch_size (cocoop's divided by zero in features.py)
    ("cocoop.batch_size=0", "cocoop.batch_size must be at least 1, got 0"),
    ("kgcoop.epochs=-1", "kgcoop.epochs must be 0 or more, got -1"),
    # past sys.maxsize: islice refused it after the first method had trained
    ("train.max_steps=1000000000000000000000000000000",
     "train.max_steps must be at most 2147483647, got 1000000000000000000000000000000"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], [override])


def test_val_shots_is_a_number_or_shots():
    assert load_config([], ["data.val_shots=6"]).data.val_shots == "6"
    assert load_config([], ["data.val_shots=shots"]).data.val_shots == "shots"
    assert load_config([], []).data.val_shots is None  # CoOp's min(K, 4)


def test_invalid_yaml_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config([f])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([tmp_path / "missing.yaml"])


def test_every_whole_number_key_is_bounded_up_front():
    """Every integer key of every section (core and methods') is refused past MAX_COUNT at config time."""
    import typing

    from promptlearn.config import all_keys

    integer_keys = [key for key, hint in all_keys().items() if int in (hint, *typing.get_args(hint))]
    assert "cocoop.batch_size" in integer_keys and "train.max_steps" in integer_keys
    for key in integer_keys:
        listed = typing.get_origin(all_keys()[key]) is list  # a list of whole numbers: each item bounded
        item = r"\[0\]" if listed else ""
        with pytest.raises(ConfigError, match=rf"{key}{item} must be at most 2147483647, got {2**63}"):
            load_config([], [f"{key}={[2**63] if listed else 2**63}"])


def test_yaml_aliases_of_mappings_are_refused_before_expansion(tmp_path):
    """Nested mapping aliases (billion laughs) flatten to 2**17 dotted keys here, each level doubling them:
    refused as the file is composed, before any expansion."""
    levels = ["a0: &a0 {x: 1, y: 2}"]
    levels += [f"a{i}: &a{i} {{p: *a{i - 1}, q: *a{i - 1}}}" for i in range(1, 17)]
    bomb = tmp_path / "laughs.yaml"
    bomb.write_text("\n".join(levels) + "\n")
    with pytest.raises(ConfigError, match=r"laughs.yaml, line 2: \*a0 repeats a mapping; config files take no "
                                          r"aliases of mappings"):
        load_config([bomb])
    merged = tmp_path / "merge.yaml"
    merged.write_text("base: &base {lr: 0.1}\ntrain:\n  <<: *base\n")
    with pytest.raises(ConfigError, match=r"merge.yaml, line 3: \*base repeats a mapping"):
        load_config([merged])
    scalar = tmp_path / "scalar.yaml"  # an alias of a single value expands nothing: still accepted
    scalar.write_text("train:\n  lr: &lr 0.01\n  warmup_lr: *lr\n")
    assert load_config([scalar]).train.warmup_lr == 0.01


def test_protocol_epochs():
    from promptlearn.data import DATASETS

    assert [protocol_epochs(k, DATASETS["oxford_pets"].epochs) for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert [protocol_epochs(k, DATASETS["imagenet"].epochs) for k in (1, 16)] == [50, 50]


def test_dataset_flag_takes_the_registered_template():
    from promptlearn.data import dataset_templates

    files, overrides = dataset_config("oxford_pets")
    assert files == [] and overrides == ["data.name=oxford_pets"]
    cfg = load_config(files, overrides)
    assert cfg.data.template is None and dataset_templates(cfg.data) == ["a photo of a {}, a type of pet."]
    assert dataset_templates(load_config([], ["data.name=dtd"]).data) == ["{} texture."]
    assert dataset_templates(load_config([], ["data.name=dtd", "data.template='{}.'"]).data) == ["{}."]
    assert dataset_config("my.yaml") == (["my.yaml"], [])


def test_dataset_yaml_copies_agree_with_the_registered_facts():
    """configs/datasets/*.yaml are readable copies of what the package registers; they must not drift."""
    from helpers import REPO

    from promptlearn.data import DATASETS

    files = sorted((REPO / "configs" / "datasets").glob("*.yaml"))
    assert {f.stem for f in files} == {n for n in DATASETS if n not in ("image_folder", "csv")}
    for f in files:
        cfg = load_config([f])
        assert cfg.data.name == f.stem
        assert cfg.data.template == DATASETS[f.stem].template, f
