"""TFDS builders (ArrayRecord, no TensorFlow): prepare from ../shared/data, random access through tfds, the
stored order, option fingerprints, the download path (URLs served from local copies)."""

from pathlib import Path

import pytest
import tensorflow_datasets as tfds

from mlret.data import tfds_builders
from mlret.data.units import LangText, ParallelUnit, dumps_unit
from mlret.errors import DataError


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def test_units_builder_roundtrip_in_reader_order(shared_data, tfds_dir):
    cfg = tfds_builders.units_config("mlqa_r", local_dir=shared_data / "mlqa-r", languages=["de", "en", "zh"],
                                     paragraph_context=True, max_negatives=4)
    builder = tfds_builders.prepare_units(cfg, tfds_dir)
    assert builder.info.splits["train"].num_examples > 0
    expected = tfds_builders.read_source_units(cfg)
    # tfds.data_source finds it by name + config, as Grain users would; order is the reader's (not key hash).
    source = tfds.data_source(f"mlret_units/{cfg.name}", data_dir=str(tfds_dir), split="train")
    assert len(source) == len(expected)
    got = [tfds_builders.decode_unit(r) for r in source.__getitems__(list(range(len(source))))]
    assert got == expected
    assert all(set(u.texts) <= {"de", "en", "zh"} for u in got)
    # Preparing again reuses the directory; other options get another one.
    assert tfds_builders.prepare_units(cfg, tfds_dir).data_dir == builder.data_dir
    other = tfds_builders.units_config("mlqa_r", local_dir=shared_data / "mlqa-r", languages=["de", "en", "zh"])
    assert other.name != cfg.name


class _LocalDownloads:
    """A download manager that serves public URLs from a local mirror, recording what was asked for."""

    def __init__(self, mirror: Path):
        self.mirror, self.urls = mirror, []

    def download(self, urls):
        self.urls += list(urls.values()) if isinstance(urls, dict) else list(urls)
        serve = lambda url: self.mirror / url.rsplit("/", 1)[1]  # noqa: E731
        return {k: serve(u) for k, u in urls.items()} if isinstance(urls, dict) else [serve(u) for u in urls]


def test_download_path_uses_the_public_urls(shared_data):
    cfg = tfds_builders.units_config("mlqa_r", languages=["de", "en"])
    dl = _LocalDownloads(shared_data / "mlqa-r")
    units = tfds_builders.read_source_units(cfg, dl)
    assert sorted(dl.urls) == [
        f"https://raw.githubusercontent.com/google-research-datasets/lareqa/"
        f"354d67d1cd066854cdfbf5ad0e6105528976141d/mlqa-r/{lang}.json" for lang in ("de", "en")]
    local = tfds_builders.units_config("mlqa_r", local_dir=shared_data / "mlqa-r", languages=["de", "en"])
    assert units == tfds_builders.read_source_units(local)


def test_jsonl_builder_and_language_filter(tmp_path, tfds_dir):
    units = [ParallelUnit(f"u{i}", "mine", {"de": LangText(f"F{i}", f"A{i}", (f"N{i}",)), "en": LangText(f"Q{i}",
                                                                                                     f"P{i}")})
             for i in range(5)] + [ParallelUnit("only-fr", "mine", {"fr": LangText("Q", "R")})]
    (tmp_path / "part1.jsonl").write_text("\n".join(dumps_unit(u) for u in units[:3]), encoding="utf-8")
    (tmp_path / "part2.jsonl").write_text("\n".join(dumps_unit(u) for u in units[3:]), encoding="utf-8")
    builder = tfds_builders.prepare_units(tfds_builders.units_config("jsonl", local_dir=tmp_path), tfds_dir)
    ds = builder.as_data_source(split="train")
    assert [tfds_builders.decode_unit(ds[i]) for i in range(len(ds))] == units
    cfg = tfds_builders.units_config("jsonl", local_dir=tmp_path, languages=["de"])
    got = tfds_builders.read_source_units(cfg)
    assert [u.id for u in got] == [f"u{i}" for i in range(5)] and all(list(u.texts) == ["de"] for u in got)


def test_builder_errors_name_the_path(tmp_path, shared_data):
    with pytest.raises(DataError, match="no such file or directory"):
        tfds_builders.read_source_units(tfds_builders.units_config("mlqa_r", local_dir=tmp_path / "nope"))
    with pytest.raises(DataError, match=r"\['el'\] not in the set"):  # MLQA has no Greek
        tfds_builders.units_config("mlqa_r", local_dir=tmp_path, languages=["el"])
    (tmp_path / "de.json").write_text("{}", encoding="utf-8")
    with pytest.raises(DataError, match=r"no mlqa-r en file \(looked for en.json anywhere below it\)"):
        tfds_builders.read_source_units(tfds_builders.units_config("mlqa_r", local_dir=tmp_path,
                                                                   languages=["de", "en"]))
    with pytest.raises(DataError, match="unknown option"):
        tfds_builders.units_config("mlqa_r", options={"passage": "context"})
