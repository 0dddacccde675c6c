"""The typed configuration: defaults, overrides, and one clear message per bad key or value."""

from __future__ import annotations

import pytest
import yaml

from diffenc_core import config
from diffenc_core.errors import ConfigError


def test_params_yaml_writes_out_every_default(repo):
    written = yaml.safe_load((repo / "params.yaml").read_text())
    assert written == config.Config().to_dict()


def test_overrides_are_typed_and_nested():
    cfg = config.load(None, ["train.beta=0.5", "em.persistent=false", "model.encoder.base=none"])
    assert cfg.train.beta == 0.5
    assert cfg.em.persistent is False
    assert cfg.model.encoder.base == "none"


def test_load_reads_file_then_applies_overrides(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("train:\n  beta: 2.0\n  steps: 7\n")
    cfg = config.load(p, ["train.steps=9"])
    assert (cfg.train.beta, cfg.train.steps) == (2.0, 9)
    assert cfg.model.latent_dim == config.ModelConfig().latent_dim


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.betta=1", "unknown key 'train.betta' (did you mean 'train.beta'?)"),
        ("em.langevn_steps=3", "did you mean 'em.langevin_steps'"),
        ("em.step_size=-0.1", "em.step_size"),
        ("model.latent_dim=0", "model.latent_dim"),
        ("data.val_fraction=1.5", "data.val_fraction"),
        ("em.target_accept=0", "em.target_accept"),
        ("train.steps=many", "train.steps"),
        ("data.dataset=cifar", "data.dataset"),
        ("tune.space.em.nothing={type: float, low: 0, high: 1}", "tune.space"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        config.load(None, [override])
    assert needle in str(err.value)


def test_bad_search_dimension_is_explained():
    with pytest.raises(ConfigError, match="log-scale dimension needs low > 0"):
        config.load(None, ["tune.space={em.step_size: {type: float, low: 0, high: 1, log: true}}"])
    with pytest.raises(ConfigError, match="categorical dimension needs"):
        config.load(None, ["tune.space={em.e_step: {type: categorical}}"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        config.load(bad)


def test_malformed_override():
    with pytest.raises(ConfigError, match="expected key=value"):
        config.load(None, ["train.beta"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        config.load(None, ["train.beta=1", "train.beta.x=1"])


def test_dump_round_trips(tmp_path):
    cfg = config.load(None, ["train.beta=0.25"])
    config.dump(cfg, tmp_path / "resolved.yaml")
    assert config.load(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("key", ["train.run", "train.warm_start"])
@pytest.mark.parametrize("name", ["../../escape", "/tmp/abs", "a/b", "a\\b", "..", ".", ".hidden", "", "x" * 300])
def test_a_run_name_is_a_name(key, name):
    """Issue 12 #3: nothing but one folder name under train.runs_dir, as an error naming the key."""
    with pytest.raises(ConfigError, match=f"--set {key}: must be one folder name under train.runs_dir"):
        config.load(None, [f"{key}={name}"])


def test_good_run_names_pass():
    assert config.load(None, ["train.run=vae-b0.5_2 (retry)"]).train.run == "vae-b0.5_2 (retry)"


@pytest.mark.parametrize("key", ["train.runs_dir", "data.root"])
def test_folders_are_not_empty(key):
    with pytest.raises(ConfigError, match=f"--set {key}: must be a non-empty path"):
        config.load(None, [f"{key}="])


def test_errors_name_the_set_that_caused_them(tmp_path):
    """Issue 12 #10: a bad --set value is reported as '--set key', not as the params file's."""
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  steps: 0\n")
    with pytest.raises(ConfigError) as err:
        config.load(p, ["train.beta=-1", "train.betta=1"])
    lines = str(err.value).splitlines()
    assert f"{p}: train.steps: Input should be greater than or equal to 1 (got 0)" in lines
    assert "--set train.beta: Input should be greater than 0 (got -1)" in lines
    assert "--set train.betta: unknown key 'train.betta' (did you mean 'train.beta'?)" in lines


def test_params_survive_a_dvc_set_param_round_trip(tmp_path, repo):
    """Issue 12 #10: `dvc exp run -S` rewrites params.yaml with its own YAML writer; the file as we
    write it (nulls as empty values) comes back with only the line that was set changed."""
    hydra = pytest.importorskip("dvc.utils.hydra")
    dumped = tmp_path / "dumped.yaml"
    config.dump(config.Config(), dumped)
    for source in (repo / "params.yaml", dumped):
        before = source.read_text()
        assert ": null" not in before, f"{source}: write nulls as empty values, the way DVC does"
        seed = config.load(source).train.seed + 1
        copy = tmp_path / "copy.yaml"
        copy.write_text(before)
        hydra.apply_overrides(str(copy), [f"train.seed={seed}"])
        after = copy.read_text()
        changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
        assert changed == [(f"  seed: {seed - 1}", f"  seed: {seed}")], changed
        assert config.load(copy) == config.with_overrides(config.load(source), {"train.seed": seed})
