"""Every experiment config in configs/ loads and validates, with no device work; the paper's fixed values are
in the paper configs; the demo's documented fields follow the environment; missing data is reported up front."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlret.config import load_config_file, load_config_module, validate
from mlret.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

PAPER_MODELS = ("xlmr", "xlmr_base", "labse")
PAPER_BATCHING = {"mono": 1.0, "xy": 0.0, "hybrid": 0.5}


def load_module(name: str):
    return load_config_module(CONFIGS / name)


def validate_run(config, num_devices: int = 4):
    validate(config, devices=num_devices, processes=1)


@pytest.mark.parametrize("model", PAPER_MODELS)
@pytest.mark.parametrize("batching", sorted(PAPER_BATCHING))
def test_paper_configs_validate_and_hold_the_papers_values(model, batching):
    c = load_module("paper.py").get_config(f"{model},{batching}")
    validate(c)
    # 4 devices: the batch of 100 splits evenly (the mesh comment in configs/paper.py).
    validate_run(c, num_devices=4)
    assert c.data.alpha == PAPER_BATCHING[batching]
    assert c.model.name == load_module("paper.py").MODELS[model]
    assert (c.optim.learning_rate, c.optim.weight_decay, c.data.global_batch) == (3e-5, 0.01, 100)
    assert (c.model.query_prefix, c.model.passage_prefix) == ("Query: ", "Passage: ")
    assert c.model.pooling == ("pooler" if model == "labse" else "mean")
    names = {s["name"] for s in c.data.sources}
    assert names == {"squad_translate", "mmarco", "mrtydi"}
    assert "mlqa" not in names and "mlqa_r" not in names and "xquad_r" not in names  # no evaluation set leaks in
    assert {"xquad_r", "mlqa_r"} <= set(c.eval.evaluators.split(","))
    assert "{lang}" in c.eval.miracl.corpus
    # The paper's MIRACL languages: the 16 known ones without English (no surprise language de / yo).
    assert c.eval.miracl.languages.split(",") == ["ar", "bn", "es", "fa", "fi", "fr", "hi", "id", "ja", "ko", "ru",
                                                   "sw", "te", "th", "zh"]


def test_paper_batch_of_100_needs_a_matching_mesh():
    c = load_module("paper.py").get_config("xlmr,hybrid")
    with pytest.raises(ConfigError, match="config.data.global_batch: 100 is not divisible by the data-parallel size 8"):
        validate_run(c, num_devices=8)
    c.mesh.tensor = 2  # what the config's comment tells an 8-device node to use
    validate_run(c, num_devices=8)


@pytest.mark.parametrize("arg", ["xlmr", "t5,hybrid", "xlmr,half", "labse,alpha=x", "xlmr,hybrid,extra"])
def test_paper_arg_errors_say_what_is_allowed(arg):
    with pytest.raises(ValueError, match="configs/paper.py"):
        load_module("paper.py").get_config(arg)


def test_paper_alpha_argument():
    assert load_module("paper.py").get_config("labse,alpha=0.3").data.alpha == 0.3


def test_paper_runlocal_reads_only_offline_data(shared_data, minilm_path, monkeypatch):
    monkeypatch.setenv("MLRET_DATA_DIR", str(shared_data))
    monkeypatch.setenv("MLRET_MODEL", str(minilm_path))
    for model in PAPER_MODELS:
        c = load_module("paper.py").get_config(f"{model},hybrid,runlocal")
        validate_run(c, num_devices=8)  # includes the preflight: every file it reads exists
        assert c.model.name == str(minilm_path) and c.data.data_dir == str(shared_data)


@pytest.mark.parametrize("name,arg", [("smoke.py", None), ("eval_xquad_r.py", None), ("demo.py", None),
                                      ("study.py", "me5"), ("study.py", "minilm")])
def test_every_other_config_validates(name, arg, shared_data, monkeypatch):
    monkeypatch.setenv("MLRET_DATA_DIR", str(shared_data))
    c = load_config_file(CONFIGS / name, arg)
    validate(c)
    from mlret.preflight import missing_data

    assert missing_data(c) == []


def test_own_data_config_reads_the_given_file(shared_data, monkeypatch, tmp_path):
    """configs/own_data.py:FILE trains on FILE (docs/own-data.md) and says so when the path is missing."""
    monkeypatch.setenv("MLRET_DATA_DIR", str(shared_data))
    units = tmp_path / "my_units.jsonl"
    units.write_text("")
    c = load_config_file(CONFIGS / "own_data.py", str(units))
    validate(c)
    assert [(s["name"], s["path"]) for s in c.data.sources] == [("jsonl", str(units))]
    from mlret.preflight import missing_data

    assert missing_data(c) == []
    with pytest.raises(ValueError, match="needs the path"):
        load_config_file(CONFIGS / "own_data.py", None)


@pytest.mark.parametrize("layout", ["mrtydi", "miracl"])
def test_eval_trec_config_needs_its_corpus_and_names_its_layouts(layout, shared_data, monkeypatch, tmp_path):
    """configs/eval_trec.py:LAYOUT validates once the corpus is named (the README's command sets it), reads the
    published topics / qrels names from data_dir, and says which layouts exist."""
    monkeypatch.setenv("MLRET_DATA_DIR", str(shared_data))
    c = load_config_file(CONFIGS / "eval_trec.py", layout)
    assert c.eval.evaluators == layout and c.eval.retrieval.per_language_index
    with pytest.raises(ConfigError, match=f"config.eval.{layout}.corpus"):
        validate(c)
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text('{"id": "d1", "contents": "x"}\n')
    c.eval[layout].corpus = str(corpus)
    c.eval[layout].languages = "sw"
    c.eval[layout].split = "dev"
    validate(c)
    from mlret.preflight import missing_data

    assert missing_data(c) == []  # the shared data's sw topics and qrels, and the corpus
    with pytest.raises(ConfigError, match="the layout is one of mrtydi, miracl"):
        load_config_file(CONFIGS / "eval_trec.py", "trec")


def test_every_config_file_is_covered():
    covered = {"paper.py", "smoke.py", "eval_xquad_r.py", "eval_trec.py", "demo.py", "study.py", "own_data.py"}
    assert {p.name for p in CONFIGS.glob("*.py")} <= covered, "add the new config to tests/test_configs.py"


def test_demo_fields_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MLRET_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MLRET_MODEL", str(tmp_path / "model"))
    c = load_module("demo.py").get_config()
    assert c.data.data_dir == str(tmp_path / "data")
    assert c.model.name == str(tmp_path / "model")
    assert c.export.dir and c.eval.every > 0 and c.eval.every <= c.train.steps
    monkeypatch.delenv("MLRET_DATA_DIR")
    monkeypatch.delenv("MLRET_MODEL")
    monkeypatch.setenv("HOME", str(tmp_path / "empty-home"))  # a fresh machine: nothing cached
    c = load_module("demo.py").get_config()
    assert c.data.data_dir == str(REPO.parent / "shared" / "data")
    # The default start model's folder, even where it does not exist yet (mlret.train builds it): no hub id.
    assert c.model.name == str(tmp_path / "empty-home" / ".cache" / "mlret" / "multilingual-e5-small")
    assert c.model.name == str(load_module("study.py").ME5_CACHE)


def test_demo_without_data_names_every_file_and_its_source(monkeypatch, tmp_path, shared_data):
    """Before any model load or compile: the error lists the files (all of them) and where they come from."""
    monkeypatch.setenv("MLRET_DATA_DIR", str(tmp_path / "nothing-here"))
    c = load_module("demo.py").get_config()
    with pytest.raises(ConfigError) as err:
        validate_run(c, num_devices=1)
    message = str(err.value)
    for lang in ("ar", "de", "en", "es", "hi", "vi", "zh"):
        assert f"{lang}.json" in message.split("mlqa-r/{")[1].split("}")[0].split(",")
    for lang in ("el", "ru", "th", "tr"):
        assert f"{lang}.json" in message.split("xquad-r/{")[1].split("}")[0].split(",")
    assert "tatoeba.cmn-eng.cmn" in message and "github.com/google-research-datasets/lareqa" in message
    assert "LASER" in message and "MLRET_DATA_DIR" in message
    # With the data present the same config passes.
    monkeypatch.setenv("MLRET_DATA_DIR", str(shared_data))
    validate_run(load_module("demo.py").get_config(), num_devices=1)


def test_apply_overrides_parses_each_value_as_its_fields_type():
    from mlret.config import apply_overrides, default_config

    c = default_config()
    apply_overrides(c, ["--config.train.steps=1e3", "data.alpha=0.25", "model.remat=true",
                        "eval.xquad_r.languages=en,de", "--config.model.normalize=no"])
    assert c.train.steps == 1000 and isinstance(c.train.steps, int)
    assert c.data.alpha == 0.25
    assert c.model.remat is True and c.model.normalize is False
    assert c.eval.xquad_r.languages == "en,de"
    with pytest.raises(ConfigError, match="'train.steps': expected field=value"):
        apply_overrides(c, ["train.steps"])
    with pytest.raises(ConfigError, match="config.train.stepz: no such config field"):
        apply_overrides(c, ["train.stepz=3"])
    # A tuple field (the training sources) takes a Python literal, as `python -m mlret.train` does.
    apply_overrides(c, ['data.sources=({"name": "jsonl", "path": "mined"}, {"name": "mlqa_r", "languages": ("en",)})'])
    assert c.data.sources == ({"name": "jsonl", "path": "mined"}, {"name": "mlqa_r", "languages": ("en",)})
    with pytest.raises(ConfigError, match="config.data.sources: .* is not a Python literal"):
        apply_overrides(c, ["data.sources=({name: jsonl},)"])
    with pytest.raises(ConfigError, match="config.data.sources: expected a tuple, got dict"):
        apply_overrides(c, ['data.sources={"name": "jsonl"}'])
