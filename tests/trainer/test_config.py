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
        (["objective.num_negatives=3"], "must be even"),
        (["model.scorer=complex", "model.dim=5"], "even dim"),
        (["train.progress=3"], "train.progress: expected true/false"),
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
