import pytest

from ensemble_kd.config import ConfigError, load_config


def test_defaults_are_the_demo():
    config = load_config()
    assert config.data.name == "digits"
    members = config.teachers.resolved_members()
    assert [m.seed for m in members] == [0, 1, 2]
    assert config.student.kwargs == {"width": 0.5}


def test_overrides_nest_and_parse_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {name: digits, batch_size: 32}\nteachers:\n  members:\n"
                    "    - {arch: small_cnn, seed: 4}\n    - {arch: mlp, seed: 5}\n")
    config = load_config(path, ["data.batch_size=16", "teachers.members.1.seed=9",
                                "teachers.train.optim.lr=0.2", "student.kwargs={width: 2.0}"])
    assert config.data.batch_size == 16
    assert [m.seed for m in config.teachers.resolved_members()] == [4, 9]
    assert config.teachers.train.optim.lr == 0.2
    assert config.student.kwargs == {"width": 2.0}


@pytest.mark.parametrize("override, words", [
    (["data.nmae=x"], "'data.nmae' is not a known option; did you mean 'name'"),
    (["teachers.train.optim.lr=-1"], "'teachers.train.optim.lr'"),
    (["teachers.count=abc"], "'teachers.count'"),
    (["teachers.train.optim.name=adam"], "'sgd' or 'adamw'"),
    (["bogus.key=1"], "'bogus' is not a known option"),
    (["student.kwargs.num_classes=100"], "'num_classes' comes from the dataset"),
    (["teachers.members=[]"], "teachers.members is empty"),
    (["data.val_fraction=1.5"], "'data.val_fraction'"),
    (["teachers.members.3.seed=1"], "'teachers.members'"),
    (["data=3", "data.name.x=1"], "is a value, not a section"),
    (["noequals"], "is not of the form key=value"),
])
def test_bad_configs_fail_in_one_sentence(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    message = str(info.value)
    assert words in message
    assert "\n" not in message


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_the_default_students_kwargs_go_only_with_its_arch(tmp_path):
    """`student: {arch: timm/resnet18}` must not inherit small_cnn's width (a first-use trial hit this)."""
    assert load_config(None, []).student.kwargs == {"width": 0.5}
    assert load_config(None, ["student.arch=timm/resnet18"]).student.kwargs == {}
    assert load_config(None, ["student.arch=wrn", "student.kwargs.depth=16"]).student.kwargs == {"depth": 16}
    path = tmp_path / "c.yaml"
    path.write_text("student: {arch: small_cnn}\n")
    assert load_config(path, []).student.kwargs == {"width": 0.5}
