"""The config machinery of every study (hessspec.studies.common.config): the exact one-line
message of every kind of bad input, ``--set`` parsing, TOML round trips and the ``--help``
rows. Expected messages and TOML texts are written out here, not computed."""

from __future__ import annotations

import dataclasses
import tomllib

import pytest

from hessspec.studies.batchnorm_spectrum import config as bn
from hessspec.studies.common.config import (
    ConfigError,
    apply_overrides,
    config_from_mapping,
    config_to_mapping,
    config_to_toml,
    describe_fields,
    field,
    read_toml,
)
from hessspec.studies.input_bias import InputBiasConfig
from hessspec.studies.santurkar import SanturkarConfig


@dataclasses.dataclass(frozen=True)
class Inner:
    rate: float = field(0.5, "a rate")
    sizes: tuple[int, ...] = field((64, 64), "widths")


@dataclasses.dataclass(frozen=True)
class Toy:
    """One field of every kind the machinery knows, and a nested table."""

    seed: int = field(0, "the seed")
    flag: bool = field(False, "a flag")
    name: str = field('say "hi"', "a name")
    pair: tuple[float, float] = field((0.5, 4.0), "a pair")
    empty: tuple[str, ...] = field((), "nothing")
    inner: Inner = dataclasses.field(default_factory=Inner)


@dataclasses.dataclass(frozen=True)
class Checked:
    """A config whose ``__post_init__`` refuses a value with a plain ValueError."""

    n: int = field(1, "positive")

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n} (set n = 1 or more).")


STUDIES = {
    "batchnorm_spectrum": bn.Config,
    "santurkar": SanturkarConfig,
    "input_bias": InputBiasConfig,
}
TRAIN_KEYS = (
    "adam_b1, adam_b2, batch_size, checkpoints, learning_rate, momentum, nesterov, "
    "num_checkpoints, optimizer, steps, track_sharpness_every, weight_decay"
)


def _message(call, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        call(*args, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------ reading a mapping


@pytest.mark.parametrize(
    ("cls", "values", "expected"),
    [
        # a value of the wrong type, per kind of field
        (bn.Config, {"train": {"steps": "5"}},
         "config key 'train.steps' must be an integer, got '5' (str)."),
        (bn.Config, {"train": {"steps": 5.0}},
         "config key 'train.steps' must be an integer, got 5.0 (float)."),
        (bn.Config, {"train": {"learning_rate": "0.1"}},
         "config key 'train.learning_rate' must be a number, got '0.1' (str)."),
        (bn.Config, {"x64": 1}, "config key 'x64' must be a boolean, got 1 (int)."),
        (bn.Config, {"x64": "true"}, "config key 'x64' must be a boolean, got 'true' (str)."),
        (bn.Config, {"title": 3}, "config key 'title' must be a string, got 3 (int)."),
        (bn.Config, {"model": {"hidden": "64"}},
         "config key 'model.hidden' must be a list of integers, got '64' (str)."),
        (bn.Config, {"model": {"hidden": [1, 2.5]}},
         "config key 'model.hidden[1]' must be an integer, got 2.5 (float)."),
        (bn.Config, {"model": {"batchnorm": [1]}},
         "config key 'model.batchnorm[0]' must be a boolean, got 1 (int)."),
        (InputBiasConfig, {"mlp": {"bn_modes": ["train", 3]}},
         "config key 'mlp.bn_modes[1]' must be a string, got 3 (int)."),
        (SanturkarConfig, {"step_range": 3},
         "config key 'step_range' must be a list of 2 numbers, got 3 (int)."),
        (SanturkarConfig, {"step_range": [0.5, "4"]},
         "config key 'step_range[1]' must be a number, got '4' (str)."),
        # a bool is not a number
        (bn.Config, {"seed": True}, "config key 'seed' must be an integer, got True (bool)."),
        (bn.Config, {"train": {"learning_rate": False}},
         "config key 'train.learning_rate' must be a number, got False (bool)."),
        (SanturkarConfig, {"sweep_learning_rates": [0.1, True]},
         "config key 'sweep_learning_rates[1]' must be a number, got True (bool)."),
        # finite floats only
        (bn.Config, {"train": {"learning_rate": float("inf")}},
         "config key 'train.learning_rate' must be finite, got inf."),
        (bn.Config, {"analysis": {"tol": float("-inf")}},
         "config key 'analysis.tol' must be finite, got -inf."),
        (InputBiasConfig, {"linear": {"variance": float("nan")}},
         "config key 'linear.variance' must be finite, got nan."),
        (SanturkarConfig, {"step_range": [0.5, float("inf")]},
         "config key 'step_range[1]' must be finite, got inf."),
        # fixed-length lists
        (SanturkarConfig, {"step_range": [0.5]},
         "config key 'step_range' must be a list of 2 values, got [0.5]."),
        (SanturkarConfig, {"step_range": [1, 2, 3]},
         "config key 'step_range' must be a list of 2 values, got [1, 2, 3]."),
        # unknown keys, with the closest valid one when there is one
        (bn.Config, {"sed": 1},
         "unknown config key 'sed'. Did you mean 'seed'? Valid keys here: analysis, data, "
         "model, seed, title, train, x64."),
        (bn.Config, {"train": {"stepz": 3}},
         f"unknown config key 'train.stepz'. Did you mean 'steps'? Valid keys here: {TRAIN_KEYS}."),
        (bn.Config, {"train": {"zzz": 3}},
         f"unknown config key 'train.zzz'. Valid keys here: {TRAIN_KEYS}."),
        (InputBiasConfig, {"bogus": 1},
         "unknown config key 'bogus'. Valid keys here: linear, mlp, seed, title, x64."),
        (InputBiasConfig, {"linear": {"experiment": "input_bias"}},
         "unknown config key 'linear.experiment'. Valid keys here: dense_check, dtype, "
         "gd_max_steps, gd_tolerance, lanczos_steps, mean, num_inputs, num_samples, sigma, "
         "slq_probes, slq_steps, tolerance, variance."),
        # a table expected
        (bn.Config, {"train": 3},
         "config key 'train' must be a table ([train] in TOML), got 3 (int)."),
        (InputBiasConfig, {"linear": [1]},
         "config key 'linear' must be a table ([linear] in TOML), got [1] (list)."),
        # another study's file
        (SanturkarConfig, {"experiment": "input_bias"},
         "config key 'experiment' is 'input_bias', but this is the 'santurkar' study."),
        (InputBiasConfig, {"experiment": "santurkar", "seed": 1},
         "config key 'experiment' is 'santurkar', but this is the 'input_bias' study."),
        # the first problem in the order of the file
        (bn.Config, {"title": 3, "sed": 1}, "config key 'title' must be a string, got 3 (int)."),
        (bn.Config, {"sed": 1, "title": 3},
         "unknown config key 'sed'. Did you mean 'seed'? Valid keys here: analysis, data, "
         "model, seed, title, train, x64."),
        # __post_init__ checks pass through with their own message
        (InputBiasConfig, {"linear": {"num_inputs": 1}},
         "config key 'linear.num_inputs' must be >= 2, got 1."),
        (InputBiasConfig, {"x64": False},
         "config key 'linear.dtype' = 'float64' needs x64 = true."),
        (SanturkarConfig, {"steps": 10, "record_every": 20},
         "config key 'record_every' must lie in [1, steps = 10], got 20."),
    ],
)  # fmt: skip
def test_config_from_mapping_messages(cls, values, expected):
    experiment = next(name for name, c in STUDIES.items() if c is cls)
    assert _message(config_from_mapping, cls, values, experiment=experiment) == expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"train": {"steps": "5"}}, "config key 'train.steps' must be an integer, got '5' (str)."),
        ({"seed": True}, "config key 'seed' must be an integer, got True (bool)."),
        ({"train": 3}, "config key 'train' must be a table ([train] in TOML), got 3 (int)."),
        ({"sed": 1}, "unknown config key 'sed'. Did you mean 'seed'? Valid keys here: "
                     "analysis, data, model, seed, title, train, x64."),
        ({"experiment": "santurkar"},
         "config key 'experiment' is 'santurkar': that is not this study "
         "('batchnorm_spectrum'); python -m hessspec.run --config FILE runs each study its "
         "file names."),
    ],
)  # fmt: skip
def test_batchnorm_config_from_dict_messages(values, expected):
    """The BatchNorm study's reader gives the same messages (its own for ``experiment``)."""
    assert _message(bn.config_from_dict, values) == expected


def test_config_from_mapping_edge_cases():
    assert _message(config_from_mapping, Toy, "x") == (
        "a config must be a mapping (TOML table), got str."
    )
    # without ``experiment=`` the key is not special
    assert _message(config_from_mapping, Inner, {"experiment": "toy"}) == (
        "unknown config key 'experiment'. Valid keys here: rate, sizes."
    )
    assert config_from_mapping(Toy, {"experiment": "toy"}, experiment="toy") == Toy()
    assert _message(config_from_mapping, Inner, {"rat": 1}, prefix="inner.") == (
        "unknown config key 'inner.rat'. Did you mean 'rate'? Valid keys here: rate, sizes."
    )
    with pytest.raises(ValueError) as info:
        config_from_mapping(Checked, {"n": 0})
    assert str(info.value) == "n must be >= 1, got 0 (set n = 1 or more)."


def test_config_from_mapping_converts_values():
    cfg = config_from_mapping(
        Toy, {"pair": [1, 2], "empty": ["a"], "inner": {"rate": 2, "sizes": []}, "seed": 2**40}
    )
    assert cfg == Toy(pair=(1.0, 2.0), empty=("a",), inner=Inner(rate=2.0, sizes=()), seed=2**40)
    assert isinstance(cfg.inner.rate, float) and all(isinstance(x, float) for x in cfg.pair)
    assert config_from_mapping(Toy, {"pair": (0.5, 1.5)}).pair == (0.5, 1.5)  # tuples too
    assert config_from_mapping(Toy, {}) == Toy()


def test_field_refuses_mutable_defaults():
    with pytest.raises(TypeError, match="use tuples for sequence defaults: configs are frozen"):
        field([1, 2], "a list")


# ------------------------------------------------------------------ --set overrides


@pytest.mark.parametrize(
    ("override", "changed"),
    [
        ("seed=3", {"seed": 3}),
        (" seed = 5 ", {"seed": 5}),
        ("flag=true", {"flag": True}),
        ("inner.rate=1", {"inner": Inner(rate=1.0)}),
        ("inner.rate=1e-5", {"inner": Inner(rate=1e-5)}),
        # strings: a TOML literal, else the text as written
        ("name=my study", {"name": "my study"}),
        ('name="quoted"', {"name": "quoted"}),
        ("name=3", {"name": "3"}),
        ("name=true", {"name": "true"}),
        ("name=a,b", {"name": "a,b"}),
        ("name=x=y", {"name": "x=y"}),
        ("name=", {"name": ""}),
        # lists: a TOML array, or bare items separated by commas
        ("pair=[1, 2.5]", {"pair": (1.0, 2.5)}),
        ("pair=1,2", {"pair": (1.0, 2.0)}),
        ("empty=a,b", {"empty": ("a", "b")}),
        ("empty=a", {"empty": ("a",)}),
        ('empty=["x y", "z"]', {"empty": ("x y", "z")}),
        ("empty=", {"empty": ()}),
        ("empty=[]", {"empty": ()}),
        ("inner.sizes=3, 4", {"inner": Inner(sizes=(3, 4))}),
        ("inner.sizes=8", {"inner": Inner(sizes=(8,))}),
    ],
)
def test_overrides_parse_values(override, changed):
    cfg = apply_overrides(Toy(), [override])
    assert cfg == dataclasses.replace(Toy(), **changed)
    assert type(cfg.inner.rate) is float


ALL_TOY_KEYS = "empty, flag, inner.rate, inner.sizes, name, pair, seed"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["seed"], "override 'seed' must look like key=value (e.g. seed=1)."),
        (["seed=1", "flag"], "override 'flag' must look like key=value (e.g. seed=1)."),
        (["seed=x"], "config key 'seed' must be an integer, got 'x' (str)."),
        (["seed=1.5"], "config key 'seed' must be an integer, got 1.5 (float)."),
        (["seed=true"], "config key 'seed' must be an integer, got True (bool)."),
        (["flag=maybe"], "config key 'flag' must be a boolean, got 'maybe' (str)."),
        (["flag=1"], "config key 'flag' must be a boolean, got 1 (int)."),
        (["inner.rate=fast"], "config key 'inner.rate' must be a number, got 'fast' (str)."),
        (["inner.rate=inf"], "config key 'inner.rate' must be finite, got inf."),
        (["inner.rate=nan"], "config key 'inner.rate' must be finite, got nan."),
        (["pair=1,2,3"], "config key 'pair' must be a list of 2 values, got [1, 2, 3]."),
        (["pair=[1]"], "config key 'pair' must be a list of 2 values, got [1]."),
        (["inner.sizes=3,x"], "config key 'inner.sizes[1]' must be an integer, got 'x' (str)."),
        (["sed=1"],
         f"unknown config key 'sed'. Did you mean 'seed'? Valid keys here: {ALL_TOY_KEYS}."),
        (["inner.rat=1"],
         "unknown config key 'inner.rat'. Did you mean 'rate'? Valid keys here: rate, sizes."),
        (["inner=1"],
         "unknown config key 'inner'. Did you mean 'inner.rate'? "
         f"Valid keys here: {ALL_TOY_KEYS}."),
        (["seed.x=1"], f"unknown config key 'seed.x'. Valid keys here: {ALL_TOY_KEYS}."),
        (["inner.rate.x=1"], "unknown config key 'inner.rate.x'. Valid keys here: rate, sizes."),
    ],
)  # fmt: skip
def test_override_messages(overrides, expected):
    assert _message(apply_overrides, Toy(), overrides) == expected


def test_override_example_and_post_init_checks():
    assert _message(apply_overrides, Toy(), ["seed"], example="inner.rate=0.1") == (
        "override 'seed' must look like key=value (e.g. inner.rate=0.1)."
    )
    assert _message(bn.apply_overrides, bn.Config(), ["train.steps"]) == (
        "override 'train.steps' must look like key=value (e.g. train.steps=200)."
    )
    assert _message(apply_overrides, SanturkarConfig(), ["record_every=100000"]) == (
        "config key 'record_every' must lie in [1, steps = 600], got 100000."
    )
    assert _message(apply_overrides, InputBiasConfig(), ["linear.num_inputs=1"]) == (
        "config key 'linear.num_inputs' must be >= 2, got 1."
    )
    with pytest.raises(ValueError) as info:
        apply_overrides(Checked(), ["n=0"])
    assert str(info.value) == "n must be >= 1, got 0 (set n = 1 or more)."


def test_overrides_apply_in_order_to_every_study():
    cfg = apply_overrides(bn.Config(), ["train.steps=7", "analysis.bn_modes=train,population"])
    assert cfg.train.steps == 7 and cfg.analysis.bn_modes == ("train", "population")
    assert apply_overrides(cfg, ["train.steps=9", "train.steps=8"]).train.steps == 8
    st = apply_overrides(SanturkarConfig(), ["step_range=0.25,2", "sweep_learning_rates="])
    assert st.step_range == (0.25, 2.0) and st.sweep_learning_rates == ()
    ib = apply_overrides(InputBiasConfig(), ["mlp.bn_modes=eval", "linear.mean=-2"])
    assert ib.mlp.bn_modes == ("eval",) and ib.linear.mean == -2.0


# ------------------------------------------------------------------ TOML out


TOY_TOML = """\
experiment = "toy"
seed = 0
flag = false
name = "say \\"hi\\""
pair = [
    0.5,
    4.0,
]
empty = []

[inner]
rate = 0.5
sizes = [
    64,
    64,
]
"""


def test_config_to_toml_text():
    assert config_to_toml(Toy(), "toy") == TOY_TOML
    assert config_to_mapping(Toy()) == {
        "seed": 0,
        "flag": False,
        "name": 'say "hi"',
        "pair": [0.5, 4.0],
        "empty": [],
        "inner": {"rate": 0.5, "sizes": [64, 64]},
    }


NON_DEFAULT = [
    ("batchnorm_spectrum", bn.Config(), []),
    (
        "batchnorm_spectrum",
        bn.Config(),
        [
            'title="a \\"quoted\\" \\\\ title: ünïcode\\ttab\\nnew line"',
            "train.learning_rate=1e-05",
            "train.momentum=0.30000000000000004",
            "train.checkpoints=0,10,30",
            "model.hidden=[]",
            "model.input_shape=32,32,3",
            "model.batchnorm=true",
            "analysis.bn_modes=eval,population",
            "analysis.memory_limit_gib=1e300",
            "data.path=/data/my folder",
            "seed=4294967295",
            "x64=false",
        ],
    ),
    ("santurkar", SanturkarConfig(), []),
    (
        "santurkar",
        SanturkarConfig(),
        ["step_range=0.25,3", "sweep_learning_rates=", "hidden=8", "variants=batchnorm"],
    ),
    ("input_bias", InputBiasConfig(), []),
    (
        "input_bias",
        InputBiasConfig(),
        ["linear.mean=-2.5", "mlp.bn_modes=eval", "title=Über 'quotes'", "mlp.enabled=false"],
    ),
]


@pytest.mark.parametrize(("experiment", "default", "overrides"), NON_DEFAULT)
def test_toml_round_trip(experiment, default, overrides):
    config = apply_overrides(default, overrides)
    text = config_to_toml(config, experiment)
    assert text.startswith(f'experiment = "{experiment}"\n')
    values = tomllib.loads(text)
    assert config_from_mapping(type(config), values, experiment=experiment) == config
    assert {k: v for k, v in values.items() if k != "experiment"} == config_to_mapping(config)


def test_round_trip_through_a_file(tmp_path):
    config = apply_overrides(bn.Config(), ["title=ü", "train.steps=3"])
    (tmp_path / "c.toml").write_text(bn.to_toml(config), encoding="utf-8")
    assert bn.load_config(tmp_path / "c.toml") == config


# ------------------------------------------------------------------ --help rows


def test_describe_fields_rows():
    assert describe_fields(Toy) == [
        ("seed", "integer", "0", "the seed"),
        ("flag", "boolean", "false", "a flag"),
        ("name", "string", '"say \\"hi\\""', "a name"),
        ("pair", "list of 2 numbers", "[0.5, 4.0]", "a pair"),
        ("empty", "list of strings", "[]", "nothing"),
        ("inner.rate", "number", "0.5", "a rate"),
        ("inner.sizes", "list of integers", "[64, 64]", "widths"),
    ]


@pytest.mark.parametrize("cls", list(STUDIES.values()), ids=list(STUDIES))
def test_describe_fields_defaults_are_toml_literals(cls):
    """Every row's default, read as TOML, is the field's default; every field has a row."""
    rows = describe_fields(cls)
    defaults = config_to_mapping(cls())
    for key, _, default, help_text in rows:
        expected = defaults
        for part in key.split("."):
            expected = expected[part]
        assert tomllib.loads(f"v = {default}")["v"] == expected, key
        assert "\n" not in default and help_text, key
    assert [row[0] for row in rows] == list(_flat(defaults))


def _flat(mapping, prefix=""):
    for k, v in mapping.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def test_describe_fields_of_the_batchnorm_study():
    rows = {row[0]: row[1:] for row in bn.describe_fields()}
    assert rows["model.hidden"] == (
        "list of integers",
        "[64, 64]",
        "mlp: widths of the hidden layers",
    )
    assert rows["data.name"][:2] == ("string", '"digits"')
    assert rows["x64"][:2] == ("boolean", "true")
    assert rows["train.learning_rate"][:2] == ("number", "0.003")
    assert rows["analysis.bn_modes"][:2] == ("list of strings", '["train"]')


# ------------------------------------------------------------------ reading files


def test_read_toml(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('experiment = "santurkar"\nsteps = 3\n[t]\nx = [1, 2]\n')
    assert read_toml(path) == {"experiment": "santurkar", "steps": 3, "t": {"x": [1, 2]}}
    missing = tmp_path / "missing.toml"
    assert _message(read_toml, missing) == f"config file {str(missing)!r} does not exist."
    assert _message(read_toml, tmp_path) == (
        f"config file {str(tmp_path)!r} is a folder; pass a TOML file, e.g. "
        "experiments/digits_mlp.toml."
    )
    path.write_bytes(b"[train]\nsteps\xff = 3\n")
    assert _message(read_toml, path) == (
        f"config file {str(path)!r} is not UTF-8 text (byte 13 is 0xff); save it as UTF-8."
    )
    path.write_text("[train\n")
    assert _message(read_toml, path).startswith(f"config file {str(path)!r} is not valid TOML: ")
