"""The typed configuration: defaults, overrides, and one clear message per bad key or value."""

from __future__ import annotations

import typing

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
    lines = str(err.value).split("; ")  # one line: every problem, separated by "; "
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


# ------------------------------------------------------------------ issue 19: bad input, one line each
def _float_keys() -> list[str]:
    """Every float value of the configuration (optional ones and tuples of floats included)."""
    def has_float(ann) -> bool:
        return ann is float or any(has_float(a) for a in typing.get_args(ann))

    return sorted(k for k, ann in config._fields(config.Config) if config._model(ann) is None and has_float(ann))


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
@pytest.mark.parametrize("key", _float_keys())
def test_every_float_must_be_finite(key, value):
    """Issue 19 #5: train.beta=.inf passed validation and failed at step 1, leaving a failed run."""
    setting = f"{key}=[{value}, 0.0]" if key == "data.bimodal.shift" else f"{key}={value}"
    setting = f"{key}=[{value}]" if key == "data.linear_gaussian.posterior_std" else setting
    with pytest.raises(ConfigError, match=f"--set {key}: .*finite number"):
        config.load(None, [setting])


def test_the_float_keys_are_found():
    assert {"train.beta", "train.time_budget_s", "em.step_size", "data.bimodal.shift"} <= set(_float_keys())


@pytest.mark.parametrize("bound", ["low", "high"])
def test_search_dimensions_must_be_finite(bound):
    with pytest.raises(ConfigError, match=f"tune.space.em.step_size.{bound}: Input should be a finite number"):
        config.load(None, [f"tune.space.em.step_size.{bound}=.inf"])


def test_a_params_file_that_is_not_utf8_is_one_line(tmp_path):
    """Issue 19 #1: a 72-line traceback ending in UnicodeDecodeError."""
    bad = tmp_path / "b.yaml"
    bad.write_bytes(b"train:\n  beta: 1\n\xff\n")
    with pytest.raises(ConfigError) as err:
        config.load(bad)
    assert str(err.value) == f"{bad}: not UTF-8 text (byte 0xff on line 3); save the params file as UTF-8"


def test_a_utf8_params_file_with_a_byte_order_mark_is_read(tmp_path):
    p = tmp_path / "bom.yaml"
    p.write_bytes("train:\n  run: café\n".encode("utf-8-sig"))
    assert config.load(p).train.run == "café"


def test_a_yaml_syntax_error_is_one_line_with_line_and_column(tmp_path):
    """Issue 19 #6: an 8-line parser excerpt."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  beta: [1, 2\n  steps: 3\n")
    with pytest.raises(ConfigError) as err:
        config.load(bad)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{bad}: not valid YAML at line 3, column ")


def test_a_folder_given_as_params_file_is_named_as_such(tmp_path):
    """Issue 19 #6: `--params <a directory>` said 'params file not found'."""
    with pytest.raises(ConfigError, match=f"^{tmp_path}: is a folder, not a params file"):
        config.load(tmp_path)


def test_an_unknown_section_is_named_by_its_set(tmp_path):
    """Issue 19 #6: `--set foo.bar=1` said "params.yaml: unknown key 'foo'"."""
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  beta: 1\n")
    with pytest.raises(ConfigError) as err:
        config.load(p, ["foo.bar=1"])
    assert str(err.value) == "--set foo.bar: unknown key 'foo.bar'"
    with pytest.raises(ConfigError, match=r"^--set train.betaa.x: unknown key 'train.betaa.x' \(did you mean"):
        config.load(p, ["train.betaa.x=1"])


def test_a_search_dimension_is_set_by_its_dotted_key():
    """Issue 19 #6: `--set tune.space.em.step_size.low=1` was a two-line 'tune.space.em.type: Field required'."""
    with pytest.raises(ConfigError) as err:
        config.load(None, ["tune.space.em.step_size.low=1"])
    assert str(err.value) == "--set tune.space.em.step_size.low: tune.space.em.step_size: 'low' must be below 'high'"
    cfg = config.load(None, ["tune.space.em.step_size.low=0.001"])
    assert cfg.tune.space["em.step_size"].low == 0.001 and cfg.tune.space["em.step_size"].log


def test_several_problems_are_one_line():
    with pytest.raises(ConfigError) as err:
        config.load(None, ["train.steps=0", "model.latent_dim=0"])
    assert "\n" not in str(err.value) and str(err.value).count("; ") == 1


@pytest.mark.parametrize("raw", ["~", "null", "~/runs", "~x"])
def test_a_run_name_is_never_read_as_yaml_null(raw):
    """Issue 19 #8: `--set train.run='~'` was read as null and silently trained runs/diffusion."""
    if raw == "null":  # text, as written: a run named 'null', never the default run
        assert config.load(None, [f"train.run={raw}"]).train.run == "null"
        return
    with pytest.raises(ConfigError, match="--set train.run: must be one folder name .*leading '.' or '~'"):
        config.load(None, [f"train.run={raw}"])


def test_text_keys_take_the_text_as_written():
    """Names, paths and choices are text: `--set train.run=123` is the run '123'; `train.device=yes`
    is refused as 'yes' (YAML would read a boolean and the message would say True)."""
    cfg = config.load(None, ["train.run=123", "data.path=2024.npz", "data.dataset=file"])
    assert cfg.train.run == "123" and cfg.data.path == "2024.npz"
    with pytest.raises(ConfigError, match=r"--set train.device: Input should be 'auto', 'cpu' or 'cuda' \(got 'yes'\)"):
        config.load(None, ["train.device=yes"])
    assert config.load(None, ["em.persistent=no", "train.beta=0.5"]).em.persistent is False  # the rest: YAML


# ------------------------------------------------------------------ issue 18 #5: one dotted-key helper
def test_a_section_given_as_a_mapping_is_merged_key_by_key(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("model:\n  latent_dim: 3\n  decoder:\n    hidden: 7\n")
    cfg = config.load(p, {"model": {"decoder.depth": 3, "encoder": {"hidden": 5}}})
    assert (cfg.model.latent_dim, cfg.model.decoder.hidden, cfg.model.decoder.depth) == (3, 7, 3)
    assert cfg.model.encoder.hidden == 5
    cfg = config.load(None, {"tune.space": {"train.beta": {"type": "float", "low": 0.5, "high": 2}}})
    assert list(cfg.tune.space) == ["train.beta"]  # a mapping is replaced whole


def test_dotted_keys_split_inside_the_search_space():
    assert config.split_key("tune.space.em.step_size.low") == ["tune", "space", "em.step_size", "low"]
    assert config.split_key("train.beta") == ["train", "beta"]
    with pytest.raises(ConfigError, match="bad key 'train..beta'"):
        config.split_key("train..beta")
    tree = config.Config().to_dict()
    assert config.lookup(tree, "tune.space.em.step_size.high") == 0.1
    flat = config.flatten(tree)
    assert flat["train.beta"] == 1.0 and flat["tune.space['em.step_size']"]["low"] == 1e-4
    assert "tune.space" not in flat and "model.decoder.hidden" in flat


def test_the_result_neutral_keys_are_configuration_keys():
    """One declaration (config.RESULT_NEUTRAL), from which resume and tuning derive their sets."""
    known = set(config._known_keys(config.Config))
    for key in {*config.RESUME_FREE, *config.STUDY_FREE}:
        assert key.rstrip(".") in known, key
    assert set(config.RESULT_NEUTRAL) <= set(config.RESUME_FREE) & set(config.STUDY_FREE)
    assert config.is_free("eval.iwae_k", config.RESUME_FREE) and config.is_free("tune.space['x']", config.RESUME_FREE)
    assert config.is_free("train.time_budget_s", config.RESUME_FREE)
    assert not config.is_free("train.time_budget_s", config.STUDY_FREE)  # it caps every trial
    assert not config.is_free("tune.objective", config.STUDY_FREE) and not config.is_free("train.beta",
                                                                                           config.RESUME_FREE)


def test_a_run_stored_before_guidance_existed_reads_as_unguided():
    """A key a stored run predates means what the code did then (its checkpoint has no guide weights), while a
    new config gets today's default; a stored value is kept."""
    tree = config.Config().to_dict()
    del tree["model"]["encoder"]["guidance"]
    assert config.from_stored(tree, "old run").model.encoder.guidance == "none"
    assert config.from_dict(tree).model.encoder.guidance == "likelihood"
    assert "guidance" not in tree["model"]["encoder"]  # the caller's tree is left as it was
    assert config.from_stored(config.Config().to_dict()).model.encoder.guidance == "likelihood"
