from pathlib import Path

import pytest

from trainer.config import load_config

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_overrides_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  dim: 16\noptim:\n  lr: 1\n")
    config = load_config(path, ["model.latent=lfm", "optim.grad_clip=5", "optim.grad_clip=null"])
    assert config.model.dim == 16 and config.model.latent == "lfm"
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.optim.grad_clip is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.dimension=3"], "unknown config key.*model.dimension"),
        (["model.dim=big"], "model.dim: expected int"),
        (["model.latent=gaussian"], "model.latent='gaussian': expected one of lim, lfm, point"),
        (["model.scorer=complex", "model.dim=5"], "even dim"),
        (["train.progress=3"], "train.progress: expected true/false"),
        (["train.matmul_precision=fast"], "train.matmul_precision='fast': expected one of highest, high, medium"),
        (["nonsense"], "expected key=value"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match=r"broken\.yaml: invalid YAML"):
        load_config(path)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path):
    load_config(path)


def test_there_are_shipped_configs():
    assert any(p.stem == "default" for p in CONFIGS)


def test_each_choice_field_accepts_exactly_its_registrys_names():
    """A choice field's type is the Literal of the registry that implements it, so the two cannot drift."""
    import typing

    from sharding.row_optim import ROW_OPTIMIZERS, RowOptimizerName
    from trainer.config import RunConfig
    from trainer.likelihood import LIKELIHOODS, LikelihoodName
    from trainer.posterior import POSTERIORS, Latent
    from trainer.scorers import SCORERS, ScorerName

    for literal, registry in [
        (ScorerName, SCORERS),
        (Latent, POSTERIORS),
        (LikelihoodName, LIKELIHOODS),
        (RowOptimizerName, ROW_OPTIMIZERS),
    ]:
        assert set(typing.get_args(literal)) == set(registry)
    hints = {
        f"{section}.{name}": hint
        for section, cls in typing.get_type_hints(RunConfig).items()
        for name, hint in typing.get_type_hints(cls).items()
    }
    assert hints["model.scorer"] is ScorerName and hints["model.latent"] is Latent
    assert hints["objective.likelihood"] is LikelihoodName and hints["optim.optimizer"] is RowOptimizerName


def test_a_config_built_in_code_is_checked_like_a_loaded_one():
    config = load_config(None)
    config.objective.likelihood = "hinge"
    with pytest.raises(ValueError, match=r"objective\.likelihood=.hinge.: expected one of bernoulli, softmax"):
        config.validate()


def test_every_numeric_field_has_its_range_in_one_place():
    import types
    import typing

    from trainer.config import RANGES, RunConfig

    numeric = set()
    for section, cls in typing.get_type_hints(RunConfig).items():
        for name, hint in typing.get_type_hints(cls).items():
            args = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) else {hint}
            if args & {int, float}:
                numeric.add(f"{section}.{name}")
    assert numeric == set(RANGES)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.checkpoint_every=0", r"train\.checkpoint_every=0: must be > 0"),
        ("train.num_threads=-1", r"train\.num_threads=-1: must be > 0"),
        ("metrics.port=70000", r"metrics\.port=70000: must be in \[1, 65535\]"),
        ("eval.num_samples=-1", r"eval\.num_samples=-1: must be >= 0"),
        ("objective.kl_weight=-1", r"objective\.kl_weight=-1\.0: must be >= 0"),
        ("optim.lr=.inf", r"optim\.lr=inf: must be a finite number"),
        ("optim.lr=.nan", r"optim\.lr=nan: must be a finite number"),
        ("model.init_logvar=1000", r"model\.init_logvar=1000\.0: must be in \[-30, 10\]"),
    ],
)
def test_out_of_range_values_are_refused_before_anything_runs(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize(
    "option",
    [
        "objective.exclude_positives=true",
        "objective.adversarial_temperature=1",
        "objective.split_by_position=true",
        "objective.relation_bias=true",
    ],
)
def test_bernoulli_options_are_refused_with_another_likelihood(option):
    with pytest.raises(ValueError, match=r"does nothing with objective\.likelihood=sampled_softmax"):
        load_config(None, ["objective.likelihood=sampled_softmax", option])
    assert load_config(None, ["objective.likelihood=bernoulli", option]).objective.likelihood == "bernoulli"


def test_exponents_without_a_dot_are_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-2\n")
    assert load_config(path, ["optim.grad_clip=5e0"]).optim.lr == 0.01
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == 0.001


def test_errors_say_whether_the_file_or_an_override_brought_them(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  dim: 16\n")
    with pytest.raises(ValueError) as caught:
        load_config(path, ["model.dimm=4"])
    assert str(caught.value) == f"{path} with --set: unknown config key(s) model.dimm"
    path.write_text("optim:\n  lr: .inf\n")
    with pytest.raises(ValueError, match=r"c\.yaml: optim\.lr=inf: must be a finite number"):
        load_config(path)
    with pytest.raises(ValueError, match=r"^--set 'model\.dim=\[1': not a YAML value"):
        load_config(None, ["model.dim=[1"])


def test_a_key_given_twice_non_utf8_and_huge_numbers_are_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  dim: 4\n  scorer: distmult\nmodel:\n  dim: 8\n")
    with pytest.raises(ValueError, match=r"c\.yaml: invalid YAML: .*key 'model' on line 4 is given on line 1"):
        load_config(path)
    path.write_text("model:\n  dim: 4\n  dim: 8\n")
    with pytest.raises(ValueError, match=r"key 'dim' on line 3 is given on line 2 already"):
        load_config(path)
    path.write_bytes(b"\xff\xfemodel: {}\n")
    with pytest.raises(ValueError, match=r"c\.yaml: not UTF-8 \(byte 0\)"):
        load_config(path)
    with pytest.raises(ValueError, match=r"optim\.lr=1000000000000000000000000000000: too large a number"):
        load_config(None, ["optim.lr=1" + "0" * 30])
    with pytest.raises(ValueError, match=r"train\.epochs=1000000000000000000000000000000: too large"):
        load_config(None, ["train.epochs=1" + "0" * 30])
    with pytest.raises(ValueError, match=r"train\.seed=18446744073709551616: too large a number"):
        load_config(None, [f"train.seed={2**64}"])
    with pytest.raises(ValueError, match=r"train\.seed=-1: must be in \[0, 1\.84467e\+19\)"):
        load_config(None, ["train.seed=-1"])
    assert load_config(None, [f"train.seed={2**64 - 1}"]).train.seed == 2**64 - 1
