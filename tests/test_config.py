"""Config system: defaults < YAML < overrides, errors that name the key, round trip through YAML."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from mindeye_dist.config import (
    ConfigError,
    ExperimentConfig,
    dump_config,
    field_docs,
    load_config,
    parse_override,
)

REPO = Path(__file__).resolve().parents[1]


def test_defaults_yaml_overrides_precedence(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  max_steps: 50\n  micro_batch_size: 8\noptim:\n  max_lr: 0.001\n")
    cfg = load_config(path, ["train.max_steps=200", "optim.betas=[0.9, 0.95]", "run.dir=/tmp/x"])
    assert cfg.train.max_steps == 200  # override beats YAML
    assert cfg.train.micro_batch_size == 8  # YAML beats default
    assert cfg.train.grad_accum_steps == 1  # default
    assert cfg.optim.max_lr == pytest.approx(1e-3)
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.run.dir == "/tmp/x"


def test_scientific_notation_override_is_a_number():
    _, value = parse_override("optim.max_lr=3e-4")
    assert value == pytest.approx(3e-4) and isinstance(value, float)
    cfg = load_config(None, ["optim.max_lr=3e-4"])
    assert cfg.optim.max_lr == pytest.approx(3e-4)


@pytest.mark.parametrize(
    "override, must_mention",
    [
        ("train.max_stepz=3", ["train.max_stepz", "max_steps"]),
        ("bogus.x=1", ["bogus"]),
        ("train.max_steps=abc", ["train.max_steps", "'abc'", "integer"]),
        ("train.max_steps=0", ["train.max_steps", "positive"]),
        ("train.precision=fp8", ["train.precision", "'fp8'", "'bf16'"]),
        ("data.train_reps=all", ["data.train_reps", "'convex'"]),
        ("loss.mixup_pct=1.5", ["loss.mixup_pct", "1.5"]),
        ("optim.betas=[0.9]", ["optim.betas"]),
        ("log.tensorboard=maybe", ["log.tensorboard", "true or false"]),
    ],
)
def test_bad_values_name_key_value_and_allowed(override, must_mention):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    for text in must_mention:
        assert text in str(info.value), (text, str(info.value))


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.max_steps"])
    with pytest.raises(ConfigError, match="dotted name"):
        load_config(None, ["train..x=1"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(None, ["run.seed=1", "run.seed.x=1"])
    with pytest.raises(ConfigError, match=r"run\.seed=\{'x': 1\}.*integer"):
        load_config(None, ["run.seed.x=1"])


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(unknown)


def test_dump_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ["train.max_steps=7", "optim.betas=[0.8,0.9]", "data.url=s3://b/p"])
    out = tmp_path / "run" / "config.yaml"
    dump_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert yaml.safe_load(out.read_text())["optim"]["betas"] == [0.8, 0.9]


def test_every_field_has_a_docstring():
    def walk(cls, prefix):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            assert docs.get(f.name), f"config field {key} has no one-line docstring"
            if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
                walk(f.default_factory, key + ".")

    walk(ExperimentConfig, "")


def test_every_shipped_experiment_yaml_loads():
    paths = sorted((REPO / "launchers" / "configs").glob("*.yaml"))
    for path in paths:
        load_config(path)


# --------------------------------------------------------------------------------------------
# YAML booleans: on/off/yes/no are words, not booleans (YAML 1.1 made log.progress=off a False)

_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}


def _literal_fields(cls, prefix=""):
    """(dotted key, Literal args) of every Literal field under ``cls``, Optional/Union included."""
    import typing

    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from _literal_fields(tp, key + ".")
            continue
        for arg in (tp, *typing.get_args(tp)):
            if typing.get_origin(arg) is typing.Literal:
                yield key, typing.get_args(arg)


WORD_FIELDS = [(key, word) for key, args in _literal_fields(ExperimentConfig) for word in args
               if isinstance(word, str) and word.lower() in _BOOL_WORDS]


def test_the_literal_fields_with_on_off_words_are_found():
    assert ("log.progress", "off") in WORD_FIELDS and ("log.progress", "on") in WORD_FIELDS


@pytest.mark.parametrize("key, word", WORD_FIELDS)
def test_every_on_off_literal_value_loads_from_yaml_and_overrides(tmp_path, key, word):
    def get(cfg):
        for part in key.split("."):
            cfg = getattr(cfg, part)
        return cfg

    *sections, name = key.split(".")
    for spelled in (word, word.upper(), word.capitalize()):
        path = tmp_path / "exp.yaml"
        nested = "".join(f"{'  ' * i}{s}:\n" for i, s in enumerate(sections))
        path.write_text(f"{nested}{'  ' * len(sections)}{name}: {spelled}\n")  # unquoted, as users write it
        assert get(load_config(path)) == word and get(load_config(None, [f"{key}={spelled}"])) == word
    # true/false and the synonyms map to the allowed word with the same meaning
    for synonym, meaning in _BOOL_WORDS.items():
        if meaning is _BOOL_WORDS[word.lower()]:
            assert get(load_config(None, [f"{key}={synonym}"])) == word


def test_a_bool_that_fits_two_words_asks_for_quotes():
    from typing import Literal

    from mindeye_dist.config import from_dict

    @dataclasses.dataclass
    class Choice:
        mode: Literal["on", "yes", "off"] = "off"

    assert from_dict(Choice, {"mode": False}).mode == "off"
    with pytest.raises(ConfigError, match=r"mode=true is ambiguous: 'on', 'yes' all mean true; write the one you mean"):
        from_dict(Choice, {"mode": True})


def test_bool_fields_accept_the_yaml_1_1_words(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("log:\n  tensorboard: off\n  jsonl: yes\nmodel:\n  lowlevel: on\n")
    cfg = load_config(path, ["loss.gather_negatives=on"])
    assert cfg.log.tensorboard is False and cfg.log.jsonl is True and cfg.loss.gather_negatives is True
    assert cfg.model.lowlevel is True  # Union[bool, Literal["auto"]]: the word is a bool
    assert load_config(None, ["model.lowlevel=auto"]).model.lowlevel == "auto"


def test_a_bad_word_is_named_without_contradiction():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["log.progress=maybe"])
    assert str(info.value) == "log.progress='maybe' is invalid: expected one of 'auto', 'on', 'off'"
    with pytest.raises(ConfigError, match=r"train.precision=False is invalid: expected one of 'fp32'"):
        load_config(None, ["train.precision=false"])


def test_yaml_file_exponent_floats_and_dump_round_trip(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("optim:\n  max_lr: 1e-3\nlog:\n  progress: off\nrun:\n  name: yes\n")
    cfg = load_config(path)
    assert cfg.optim.max_lr == pytest.approx(1e-3) and cfg.run.name == "yes"
    dump_config(cfg, tmp_path / "out.yaml")
    again = load_config(tmp_path / "out.yaml")
    assert again == cfg and yaml.safe_load((tmp_path / "out.yaml").read_text())["log"]["progress"] == "off"
