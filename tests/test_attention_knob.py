"""The one attention knob, ``model.attention`` (``gist_jax/model/kernels.py``): its grammar and
canonical names, the kernel tables it names, the gist-kernel refusals (``check_gist_kernel``), and
the deprecation shim that reads the two keys it replaced (``model.attention_impl``,
``compression.attention_impl``) from run configs, the command line, saved model configs and the
run dicts stored in checkpoints. No compiles."""

from __future__ import annotations

import dataclasses
import pathlib
import warnings

import pytest

from gist_jax.errors import ConfigError
from gist_jax.gist import forward
from gist_jax.gist.config import CompressionConfig, check_gist_kernel
from gist_jax.model import causal
from gist_jax.model.config import ModelConfig, preset
from gist_jax.model.kernels import (
    BOTH,
    CAUSAL_KERNELS,
    GIST_KERNEL_NAMES,
    AttentionChoice,
    parse_attention,
    with_gist_kernel,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
DEPRECATED = "deprecated keys, read as model.attention="
NEEDS_ML_COLLECTIONS = pytest.mark.requires("ml_collections")

# -- the grammar -------------------------------------------------------------------------------------

# (value, (causal part, gist part), canonical name)
ACCEPTED = [
    ("auto", ("auto", "auto"), "auto"),
    ("dense", ("dense", "dense"), "dense"),
    ("blockwise", ("blockwise", "auto"), "blockwise"),
    ("cudnn", ("cudnn", "auto"), "cudnn"),
    ("splash", ("splash", "auto"), "splash"),
    ("decomposed", ("auto", "decomposed"), "decomposed"),
    ("flash", ("auto", "flash"), "flash"),
    ("split", ("auto", "split"), "split"),
    ("bank", ("auto", "bank"), "bank"),
    ("cudnn,split", ("cudnn", "split"), "cudnn,split"),
    ("splash,bank", ("splash", "bank"), "splash,bank"),
    ("blockwise,dense", ("blockwise", "dense"), "blockwise,dense"),
    ("auto,dense", ("auto", "dense"), "auto,dense"),  # only the gist pass the reference
    ("dense,auto", ("dense", "auto"), "dense,auto"),  # only the causal passes the reference
    ("dense,flash", ("dense", "flash"), "dense,flash"),
    ("auto,auto", ("auto", "auto"), "auto"),
    ("dense,dense", ("dense", "dense"), "dense"),
    ("cudnn,auto", ("cudnn", "auto"), "cudnn"),
    ("auto,decomposed", ("auto", "decomposed"), "decomposed"),
    (" cudnn , split ", ("cudnn", "split"), "cudnn,split"),  # spaces around the parts are stripped
]


@pytest.mark.parametrize("value,parts,name", ACCEPTED, ids=[a[0].strip() for a in ACCEPTED])
def test_accepted_forms_parse_to_their_parts_and_canonical_name(value, parts, name):
    choice = parse_attention(value)
    assert (choice.causal, choice.gist) == parts
    assert choice.name == name
    assert parse_attention(name) == choice  # the canonical name reads back as the same choice
    assert parse_attention(name).name == name
    assert preset("tiny", attention=value).kernels == choice  # the model config's view of it


REJECTED = [
    "flash,blockwise",   # the parts swapped: a gist kernel in the causal place
    "cudnn,cudnn",       # two causal kernels
    "split,split",       # two gist kernels
    "splash,splash",
    "auto,cudnn",        # a causal kernel in the gist place
    "auto,dense,auto",   # three parts
    "cudnn,",            # an empty part
    ",split",
    "",
    "Flash",             # names are lower case
    "windowed",          # the kernel the window resolves to, not a name to ask for
    "xla",
]


@pytest.mark.parametrize("value", REJECTED)
def test_rejected_forms_raise_a_one_line_config_error_naming_the_key(value):
    with pytest.raises(ConfigError) as err:
        parse_attention(value, key="some.key")
    message = str(err.value)
    assert message.startswith(f"some.key={value!r} is not an attention choice; use ") and "\n" not in message
    assert "cudnn,split" in message  # the message shows the two-part form
    with pytest.raises(ConfigError, match="^model.attention="):
        parse_attention(value)
    with pytest.raises(ConfigError, match="model.attention="):
        preset("tiny", attention=value)  # ModelConfig validates at construction


def test_canonical_name_of_every_pair_round_trips():
    """Every (causal, gist) pair the grammar can express has a name that parses back to it."""
    for c in BOTH + CAUSAL_KERNELS:
        for g in BOTH + GIST_KERNEL_NAMES:
            choice = AttentionChoice(c, g)
            assert parse_attention(choice.name) == choice, choice
            assert parse_attention(f"{c},{g}") == choice


def test_with_gist_kernel_replaces_only_the_gist_part():
    assert with_gist_kernel("auto", "dense") == "auto,dense"  # not "dense": that is both passes
    assert with_gist_kernel("auto", "split") == "split"
    assert with_gist_kernel("auto", "auto") == "auto"
    assert with_gist_kernel("dense", "dense") == "dense"
    assert with_gist_kernel("dense", "flash") == "dense,flash"
    assert with_gist_kernel("dense", "auto") == "dense,auto"
    assert with_gist_kernel("cudnn", "split") == "cudnn,split"
    assert with_gist_kernel("cudnn,split", "auto") == "cudnn"
    assert with_gist_kernel("split", "bank") == "bank"
    assert with_gist_kernel("split", "dense") == "auto,dense"
    assert with_gist_kernel("blockwise,decomposed", "dense") == "blockwise,dense"
    with pytest.raises(ConfigError, match="'auto,cudnn' is not an attention choice"):
        with_gist_kernel("auto", "cudnn")  # a causal kernel as the gist part fails at once
    for attention in ("auto", "dense", "cudnn", "flash", "splash,bank", "dense,auto"):
        for gist in BOTH + GIST_KERNEL_NAMES:
            got = parse_attention(with_gist_kernel(attention, gist))
            assert (got.causal, got.gist) == (parse_attention(attention).causal, gist)
    with pytest.raises(ConfigError):
        with_gist_kernel("flash,blockwise", "split")  # the input is parsed


def test_the_names_are_the_kernel_tables():
    """Every gist name the knob accepts is a kernel class (plus the window's own, which no one
    names), every causal name is one ``causal.resolve_impl`` takes, and no name is in both."""
    assert set(forward.GIST_KERNELS) == set(GIST_KERNEL_NAMES) | {"windowed"}
    assert causal.IMPLS == BOTH + CAUSAL_KERNELS
    assert not set(CAUSAL_KERNELS) & set(GIST_KERNEL_NAMES) and not set(BOTH) & set(CAUSAL_KERNELS + GIST_KERNEL_NAMES)
    for name in CAUSAL_KERNELS:
        assert causal.resolve_impl(name, "cpu", "float32", 8) == name
    for name in GIST_KERNEL_NAMES:
        with pytest.raises(ValueError, match=f"causal attention kernel {name!r} is unknown"):
            causal.resolve_impl(name, "cpu", "float32", 8)


def test_the_old_fields_are_gone():
    assert "attention_impl" not in {f.name for f in dataclasses.fields(CompressionConfig)}
    assert "attention_impl" not in {f.name for f in dataclasses.fields(ModelConfig)}
    assert ModelConfig().attention == "auto" and ModelConfig().kernels == AttentionChoice("auto", "auto")
    with pytest.raises(TypeError):
        CompressionConfig(attention_impl="dense")  # type: ignore[call-arg]


# -- check_gist_kernel -------------------------------------------------------------------------------


def _kv(**kw) -> CompressionConfig:
    fields = dict(memory="kv", granularity="fine", positions="aligned", segment_length=16, ratios=(4,),
                  ratio_sampling="fixed", num_sinks=2) | kw
    return CompressionConfig(**fields)


def test_check_gist_kernel_refusals():
    with pytest.raises(ConfigError, match=r"^model.attention='bank': .*positions='aligned' \(got 'compressed'\)"):
        check_gist_kernel("bank", _kv(positions="compressed"))
    with pytest.raises(ConfigError, match="^model.attention='cudnn,bank': .*ratio_sampling='per_segment'"):
        check_gist_kernel("cudnn,bank", _kv(ratios=(4, 8), ratio_sampling="per_segment"))
    with pytest.raises(ConfigError, match="^model.attention='flash': the gist kernel 'flash' has no windowed"):
        check_gist_kernel("flash", _kv(window=8))
    with pytest.raises(ConfigError, match="^run.attention='split':"):  # the key is the caller's
        check_gist_kernel("split", _kv(window=8), key="run.attention")
    with pytest.raises(ConfigError, match="is not an attention choice"):
        check_gist_kernel("flash,blockwise", _kv())
    for message in _messages(lambda: check_gist_kernel("bank", _kv(positions="compressed"))):
        assert "\n" not in message


def _messages(fn) -> list[str]:
    try:
        fn()
    except ConfigError as e:
        return [str(e)]
    return []


def test_check_gist_kernel_accepts_what_runs_exactly():
    for gist in BOTH + GIST_KERNEL_NAMES:  # every kernel: aligned positions, one ratio, no window
        check_gist_kernel(gist, _kv())
        check_gist_kernel(f"cudnn,{gist}", _kv())
    for gist in ("decomposed", "flash", "split", "auto", "dense"):  # every kernel but the bank: both schemes
        check_gist_kernel(gist, _kv(positions="compressed", granularity="coarse"))
        check_gist_kernel(gist, _kv(ratios=(4, 8), ratio_sampling="per_segment"))
    for attention in ("auto", "dense", "decomposed", "auto,dense", "cudnn", "splash,decomposed"):
        check_gist_kernel(attention, _kv(window=8))  # the window: its one kernel, auto or the reference
    check_gist_kernel("bank", _kv(ratios=(4, 8), ratio_sampling="per_instance"))  # one ratio per step


@pytest.mark.parametrize("memory,granularity", [("recurrent", "coarse"), ("none", "fine")])
def test_check_gist_kernel_ignores_memories_without_a_gist_structure(memory, granularity):
    """Coarse-Rec and full attention run causal passes only: a named gist kernel, even one the
    layout would refuse for KV, is ignored (it used to be an error)."""
    comp = CompressionConfig(memory=memory, granularity=granularity, positions="compressed", segment_length=16,
                             ratios=(4, 8), ratio_sampling="per_segment")
    for attention in ("bank", "split", "flash", "cudnn,bank", "decomposed", "dense", "auto"):
        check_gist_kernel(attention, comp)
    with pytest.raises(ConfigError, match="is not an attention choice"):
        check_gist_kernel("split,split", comp)  # the knob itself is still parsed


# -- the deprecation shim: run configs ---------------------------------------------------------------


def _run_dict(**sections) -> dict:
    from gist_jax.train.experiment import default_config

    cd = default_config().to_dict()
    for section, values in sections.items():
        cd[section].update(values)
    return cd


@NEEDS_ML_COLLECTIONS
def test_default_config_reads_without_a_warning_and_writes_only_the_new_key():
    from gist_jax.train.experiment import default_config, run_config

    cd = default_config()
    assert cd.model.attention == "auto"
    assert cd.model.attention_impl == cd.compression.attention_impl == ""  # still overridable, as strings
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        run = run_config(cd)
    out = run.to_dict()
    assert out["model"]["attention"] == "auto"
    assert "attention_impl" not in out["model"] and "attention_impl" not in out["compression"]


@NEEDS_ML_COLLECTIONS
@pytest.mark.parametrize("model_key,comp_key,expected", [
    (None, "split", "split"),
    (None, "dense", "auto,dense"),   # the old gist-only dense: the causal passes stay auto
    ("blockwise", None, "blockwise"),
    ("dense", None, "dense,auto"),   # the old causal-only dense
    ("cudnn", "split", "cudnn,split"),
    ("dense", "dense", "dense"),
    ("auto", "auto", "auto"),
])
def test_legacy_run_config_keys_are_read_as_model_attention(model_key, comp_key, expected):
    from gist_jax.train.experiment import run_config

    sections = {}
    if model_key is not None:
        sections["model"] = {"attention_impl": model_key}
    if comp_key is not None:
        sections["compression"] = {"attention_impl": comp_key}
    with pytest.warns(FutureWarning, match=f"{DEPRECATED}'{expected}'; write that instead") as record:
        run = run_config(_run_dict(**sections))
    assert run.model.attention == expected
    lines = [str(w.message) for w in record if issubclass(w.category, FutureWarning)]
    assert len(lines) == 1 and "\n" not in lines[0]
    for key, value in (("model.attention_impl", model_key), ("compression.attention_impl", comp_key)):
        assert (f"{key}={value!r}" in lines[0]) == (value is not None)
    out = run.to_dict()
    assert out["model"]["attention"] == expected and "attention_impl" not in out["compression"]


@NEEDS_ML_COLLECTIONS
def test_legacy_and_new_key_together_is_a_config_error():
    from gist_jax.train.experiment import run_config

    for sections in ({"model": {"attention": "cudnn", "attention_impl": "blockwise"}},
                     {"model": {"attention": "split"}, "compression": {"attention_impl": "flash"}}):
        with pytest.raises(ConfigError, match="are both set; keep model.attention only"):
            run_config(_run_dict(**sections))


@NEEDS_ML_COLLECTIONS
def test_legacy_keys_go_through_the_new_validation():
    """What the old keys ask is checked as model.attention would be: an unknown old value is one
    ConfigError naming the old keys; a gist kernel the layout refuses is ``check_gist_kernel``'s."""
    from gist_jax.train.experiment import run_config

    with pytest.raises(ConfigError, match=r"^model.attention_impl='flash' \(deprecated\) is unknown; use "
                                          r"model.attention: \('auto', 'dense', 'blockwise', 'cudnn', 'splash'\)$"):
        run_config(_run_dict(model={"attention_impl": "flash"}))  # a gist kernel in the causal key
    with pytest.raises(ConfigError, match=r"^compression.attention_impl='cudnn' \(deprecated\) is unknown"):
        run_config(_run_dict(compression={"attention_impl": "cudnn"}))
    with pytest.raises(ConfigError, match="model.attention='bank'"), pytest.warns(FutureWarning):
        run_config(_run_dict(compression={"attention_impl": "bank", "positions": "compressed"}))


@NEEDS_ML_COLLECTIONS
def test_new_key_is_validated_in_the_run_config():
    from gist_jax.train.experiment import run_config

    with pytest.raises(ConfigError, match="model.attention='flash,blockwise' is not an attention choice"):
        run_config(_run_dict(model={"attention": "flash,blockwise"}))
    with pytest.raises(ConfigError, match="model.attention='bank'.*positions='aligned'"):
        run_config(_run_dict(model={"attention": "bank"}, compression={"positions": "compressed"}))
    run = run_config(_run_dict(model={"attention": "bank"}, compression={"memory": "recurrent",
                                                                         "granularity": "coarse"}))
    assert run.model.attention == "bank"  # ignored by Coarse-Rec, not refused


@NEEDS_ML_COLLECTIONS
def test_cli_override_of_the_legacy_key_reaches_model_attention():
    from gist_jax.cli_config import load_run

    with pytest.warns(FutureWarning, match=f"compression.attention_impl='split': {DEPRECATED}'split'"):
        run = load_run(f"{REPO}/experiments/demo.py:tiny", ["--config.compression.attention_impl=split"])
    assert run.model.attention == "split"
    with pytest.warns(FutureWarning, match=f"{DEPRECATED}'cudnn,split'"):
        run = load_run(f"{REPO}/experiments/demo.py:tiny", ["--config.compression.attention_impl=split",
                                                             "--config.model.attention_impl=cudnn"])
    assert run.model.attention == "cudnn,split"
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert load_run(f"{REPO}/experiments/demo.py:tiny",
                        ["--config.model.attention=cudnn,split"]).model.attention == "cudnn,split"


# -- the deprecation shim: saved model configs and checkpoints' stored runs --------------------------


def test_model_config_from_dict_reads_attention_impl():
    saved = preset("tiny").to_dict()
    del saved["attention"]
    for old, expected in (("blockwise", "blockwise"), ("dense", "dense,auto"), ("auto", "auto")):
        with pytest.warns(FutureWarning, match=f"model.attention_impl={old!r}: {DEPRECATED}{expected!r}"):
            cfg = ModelConfig.from_dict({**saved, "attention_impl": old})
        assert cfg.attention == expected and cfg == preset("tiny", attention=expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert ModelConfig.from_dict(preset("tiny", attention="cudnn,split").to_dict()).attention == "cudnn,split"
    with pytest.raises(ConfigError, match="unknown model config keys"):
        ModelConfig.from_dict({**saved, "attention_kernel": "auto"})
    with pytest.raises(ConfigError, match="attention='split' and the deprecated attention_impl='cudnn'; keep "
                                          "attention only"):
        ModelConfig.from_dict({**saved, "attention": "split", "attention_impl": "cudnn"})


@NEEDS_ML_COLLECTIONS
def test_resuming_a_run_stored_with_the_legacy_keys_changes_no_attention_key():
    """A checkpoint's stored run dict from before the knob (``model.attention_impl`` and
    ``compression.attention_impl``, no ``model.attention``) against the run read back from it:
    no key that blocks a resume differs, while a real change still does."""
    from gist_jax.train import integrity
    from gist_jax.train.experiment import run_config

    stored = run_config(_run_dict()).to_dict()
    del stored["model"]["attention"]
    stored["model"]["attention_impl"] = "auto"
    stored["compression"]["attention_impl"] = "split"
    with pytest.warns(FutureWarning, match=f"{DEPRECATED}'split'"):
        run = run_config(stored)
    assert run.model.attention == "split"
    assert integrity.changed_keys(stored, run.to_dict()) == {}
    integrity.check_resume_config(stored, run.to_dict(), "ckpt")
    # a resume that changes the kernel is allowed too (execution only), a real change is not
    assert integrity.changed_keys(stored, run_config(_run_dict(model={"attention": "cudnn,split"})).to_dict()) == {}
    changed = run_config(_run_dict(compression={"segment_length": 32})).to_dict()
    assert set(integrity.changed_keys(stored, changed)) == {"compression.segment_length"}
