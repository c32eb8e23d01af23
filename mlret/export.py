"""Export a dual encoder to a folder that `transformers.AutoModel` and `sentence_transformers.SentenceTransformer`
load with no extra code: config.json, model.safetensors (HF names), the tokenizer files, the
sentence-transformers modules (`modules.json`, `1_Pooling/`, `2_Dense/` for pooler pooling, `Normalize`),
`config_sentence_transformers.json` with the prompts (`query`; `document` and `passage`, the same prefix), and a
README.md model card (`mlret.card`).

Lengths. sentence-transformers has one `max_seq_length` for every text; mlret writes the start model's own (its
sentence-transformers folder's, else the limit of its tokenizer and position table), never a training length:
an unchanged model then re-exports to the identity on texts of any length, and a trained one still reads long
passages as far as its positions go instead of silently losing their ends. Where mlret truncated differently,
the Transformer module's per-task `query_length` / `document_length` (sentence-transformers >= 5.2, used by
`encode_query` / `encode_document`) say so: for a trained model, the lengths its run evaluated with, so those
calls reproduce the numbers in the card; the lengths it was trained with are stated in the card.

    python -m mlret.export --hf PATH_OR_ID --out DIR            # re-export a HF model through mlret
    python -m mlret.export --checkpoint RUN_DIR [--step N] --out DIR

Untied towers cannot both live in one plain HF folder: the query tower is written to DIR and the passage tower,
as a complete folder of its own, to DIR/passage_tower/ (the model card says so). Encode queries with DIR and
passages with DIR/passage_tower.

`pooler` pooling (tanh(dense(h_CLS)), LaBSE style) has no sentence-transformers Pooling mode: it is exported as
CLS pooling followed by a `Dense` module with tanh holding the pooler weights, as sentence-transformers ships
LaBSE. The pooler also stays in model.safetensors, so AutoModel's `pooler_output` is the same vector.
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from etils import epath
from safetensors.numpy import save_file

import mlret
from mlret import cli, storage
from mlret.card import PASSAGE_TOWER_DIR, model_card
from mlret.checkpoint import restore_for_export
from mlret.config import default_config
from mlret.console import route_logging
from mlret.losses import parse_matryoshka
from mlret.models import DualEncoder, Encoder, TextTokenizer, encoder_to_tensors, load_dual_encoder, resolve_model_dir

# sentence-transformers' Tanh, by the import path its Dense module accepts without trust_remote_code.
_TANH = "torch.nn.modules.activation.Tanh"


def export_model(model: DualEncoder, tokenizer: TextTokenizer, model_config: Any, out_dir: str | os.PathLike[str],
                 *, results: Mapping[str, Any] | None = None, run_config: Any = None,
                 baseline: Mapping[str, Any] | None = None, lengths: tuple[int, int] | None = None) -> epath.Path:
    """Write `model` (parameters in memory) as a HF + sentence-transformers folder, local or gs://; returns it.

    model_config is `config.model` (its name and prefixes are recorded). results, when given, maps
    {benchmark: {metric: value}} (or {metric: value}) for the model card; baseline, the same for the start model
    (the run's step-0 evaluation), shown beside it. run_config is the whole config of the training run that
    produced the weights (None: a re-export of an unchanged model); the card records it.

    Lengths: sentence-transformers' `max_seq_length` is always the start model's own (its sentence-transformers
    folder's, else its tokenizer's / position table's limit), so an unchanged model re-exports to the identity
    and a trained one reads long texts as far as its positions go. `lengths` = (query, document) become the
    Transformer module's `query_length` / `document_length`, the truncation `encode_query` / `encode_document`
    apply; by default, for a trained model, the lengths its run evaluated with (config.eval, else config.data),
    so those calls encode as mlret encoded the card's results; for an unchanged one, none.
    """
    if lengths is None and run_config is not None:
        lengths = eval_lengths(run_config)
    out = storage.path(out_dir, "the export folder")
    if storage.is_gcs(out):  # safetensors and tokenizers write local files: a local folder, then copied whole
        with tempfile.TemporaryDirectory(prefix="mlret-export-") as tmp:
            export_model(model, tokenizer, model_config, tmp, results=results, run_config=run_config,
                         baseline=baseline, lengths=lengths)
            storage.sync_dir(epath.Path(tmp), out)
        return out
    towers = [("query", model.towers.query, out)]
    if not model.tied:
        towers.append(("passage", model.towers.passage, out / PASSAGE_TOWER_DIR))
    try:
        for role, encoder, folder in towers:
            _write_folder(encoder, tokenizer, model, model_config, folder, role=role, lengths=lengths,
                          run_config=run_config,
                          card=functools.partial(model_card, model, tokenizer, model_config, role=role,
                                                 results=results, baseline=baseline, run_config=run_config))
    except Exception as e:  # noqa: BLE001 (safetensors and tokenizers raise their own types for an OS error)
        if not _disk_full(e):
            raise
        raise storage.StorageError(f"storage: export {out} failed: no space left on the device (or over quota) "
                                   f"while writing the model folder ({cli.message(e)}); the folder is incomplete: "
                                   "free space and export again") from e
    return out


def _disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT, as an OSError or as the message of a library's own error type."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(text in str(e) for text in ("No space left on device", "Disk quota exceeded"))


def eval_lengths(config: Any) -> tuple[int, int]:
    """(query, passage) lengths mlret's evaluation encodes with: config.eval's where set, else config.data's."""
    return (int(config.eval.query_len or config.data.query_len), int(config.eval.passage_len or
                                                                     config.data.passage_len))


def st_transformer_config(tokenizer: TextTokenizer, cfg: Any, lengths: tuple[int, int] | None) -> dict[str, Any]:
    """sentence_bert_config.json: the source folder's (max_seq_length, do_lower_case) or, when it has none, the
    limit its tokenizer and position table allow; plus `query_length` / `document_length` when given."""
    src = Path(tokenizer.name_or_path) / "sentence_bert_config.json"
    st = json.loads(src.read_text()) if src.is_file() else {}
    limit = min(cfg.max_length, int(getattr(tokenizer.hf, "model_max_length", cfg.max_length) or cfg.max_length))
    out = {"max_seq_length": int(st.get("max_seq_length") or limit),
           "do_lower_case": bool(st.get("do_lower_case", False))}
    if lengths is not None:
        out["query_length"], out["document_length"] = (min(int(n), out["max_seq_length"]) for n in lengths)
    return out


def _write_folder(encoder: Encoder, tokenizer: TextTokenizer, model: DualEncoder, model_config: Any, out: epath.Path,
                  *, role: str, lengths: tuple[int, int] | None, card: Callable[..., str],
                  run_config: Any = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cfg = encoder.cfg
    (out / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2, sort_keys=True) + "\n")
    save_file(encoder_to_tensors(encoder), str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(out)

    # sentence-transformers: Transformer -> Pooling -> (Dense tanh for pooler pooling) -> (Normalize).
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    st_config = st_transformer_config(tokenizer, cfg, lengths)
    _write_json(out / "sentence_bert_config.json", st_config)
    _write_json(out / "1_Pooling" / "config.json", {
        "word_embedding_dimension": cfg.hidden_size,
        "pooling_mode_cls_token": model.pooling in ("cls", "pooler"),
        "pooling_mode_mean_tokens": model.pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_lasttoken": model.pooling == "last",
        # False: the prompt's tokens (query / document prefix) are left out of the pooling, as mlret pooled.
        "include_prompt": model.include_prompt,
    })
    if model.pooling == "pooler":
        tensors = encoder_to_tensors(encoder)
        _write_json(out / "2_Dense" / "config.json", {"in_features": cfg.hidden_size, "out_features": cfg.hidden_size,
                                                      "bias": True, "activation_function": _TANH})
        save_file({"linear.weight": tensors["pooler.dense.weight"], "linear.bias": tensors["pooler.dense.bias"]},
                  str(out / "2_Dense" / "model.safetensors"), metadata={"format": "pt"})
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    if model.normalize:
        idx = len(modules)
        (out / f"{idx}_Normalize").mkdir(exist_ok=True)
        modules.append({"idx": idx, "name": str(idx), "path": f"{idx}_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    _write_json(out / "modules.json", modules)
    _write_json(out / "config_sentence_transformers.json", {
        "model_type": "SentenceTransformer",
        "__version__": {"mlret": mlret.__version__},
        # "document" is the prompt encode_document uses; "passage" is mlret's name for the same prefix.
        "prompts": {"query": tokenizer.query_prefix, "document": tokenizer.passage_prefix,
                    "passage": tokenizer.passage_prefix},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine" if model.normalize else "dot",
        # The Matryoshka dimensions the run trained (config.loss.matryoshka_dims), largest first: the values of
        # `SentenceTransformer(..., truncate_dim=)` that were trained. sentence-transformers ignores the key.
        **({"matryoshka_dims": dims} if (dims := matryoshka_dims(run_config)) else {}),
    })
    (out / "README.md").write_text(card(st_config=st_config))


def matryoshka_dims(run_config: Any) -> list[int]:
    """The Matryoshka dimensions a run trained, largest first ([] for none or an unchanged re-export)."""
    if run_config is None:
        return []
    return sorted((d for d, _ in parse_matryoshka(run_config.loss)), reverse=True)


def _write_json(path: epath.Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- CLI


def st_settings(model_dir: epath.Path) -> dict[str, Any]:
    """Pooling, normalisation and prompts of a sentence-transformers folder as `config.model` fields (what
    re-exporting keeps and `mlret.evaluate --hf` uses); empty for a plain transformers folder."""
    out: dict[str, Any] = {}
    pooling = model_dir / "1_Pooling" / "config.json"
    if pooling.is_file():
        p = json.loads(pooling.read_text())
        mode = p.get("pooling_mode")
        if mode is None:
            mode = next((m for m, k in (("cls", "pooling_mode_cls_token"), ("mean", "pooling_mode_mean_tokens"),
                                        ("lasttoken", "pooling_mode_lasttoken")) if p.get(k)), None)
        mode = "last" if mode == "lasttoken" else mode
        if mode in ("cls", "mean", "last"):
            out["pooling"] = mode
        if p.get("include_prompt") is False:
            out["include_prompt"] = False
    modules = model_dir / "modules.json"
    if modules.is_file():
        types = [m.get("type", "") for m in json.loads(modules.read_text())]
        out["normalize"] = any(t.endswith("Normalize") for t in types)
        if any(t.endswith("Dense") for t in types) and out.get("pooling") == "cls":
            out["pooling"] = "pooler"  # CLS + Dense(tanh): how sentence-transformers writes pooler pooling
    st = model_dir / "config_sentence_transformers.json"
    if st.is_file():
        prompts = json.loads(st.read_text()).get("prompts") or {}
        if "query" in prompts:
            out["query_prefix"] = prompts["query"]
        for name in ("document", "passage"):  # sentence-transformers' name, then mlret's
            if name in prompts:
                out["passage_prefix"] = prompts[name]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlret.export", description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="Hugging Face hub id or local model folder to re-export through mlret")
    src.add_argument("--checkpoint", help="a training run directory (orbax checkpoints)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--results", help="JSON file of evaluation results to put in the model card (the --out "
                        "file of `python -m mlret.evaluate`: its per-evaluator `summary` block is used, and the "
                        "by-dimension rows of an evaluation with config.eval.dims)")
    g = parser.add_argument_group("--hf only (defaults: the source folder's sentence-transformers settings, "
                                  "else mlret's config defaults)")
    g.add_argument("--pooling", choices=("cls", "mean", "pooler", "last"))
    g.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--query_prefix")
    g.add_argument("--passage_prefix")
    g.add_argument("--query_len", type=int, help="encode_query's truncation in the export (default: none, the "
                   "source's max_seq_length)")
    g.add_argument("--passage_len", type=int, help="encode_document's truncation (default: none)")
    parser.add_argument("--verbose", action="store_true", help="library INFO messages on the terminal too; they "
                        "always go to the log file beside --out (DIR.log)")
    args = parser.parse_args(argv)
    prog = "mlret.export"
    log_file = None
    if argv is None:  # the command line (an in-process caller, e.g. a test, keeps its own logging)
        log_file = cli.log_path(args.out)
        route_logging(log_file, "info" if args.verbose else "warning")  # before transformers is imported
    results = None
    if args.results:
        with cli.user_errors(prog, "--results"):
            results = json.loads(storage.path(args.results, "--results").read_text())
        # mlret.evaluate nests {"summary": {evaluator: {metric: value}}, "results": {...full detail...}}; an
        # evaluator evaluated by embedding dimension (config.eval.dims) keeps its by-dimension rows, which the card
        # shows as the end-of-training export's card does.
        if isinstance(results, dict) and isinstance(results.get("summary"), dict):
            blocks = results.get("results") if isinstance(results.get("results"), dict) else {}
            results = {name: ({"summary": summary, **{k: blocks[name][k] for k in ("by_dim", "dim_metrics", "dim")
                                                      if k in blocks[name]}}
                              if isinstance(blocks.get(name), dict) and blocks[name].get("by_dim") else summary)
                       for name, summary in results["summary"].items()}
        if not isinstance(results, dict):
            cli.fail(prog, f"--results {args.results}: expected the JSON object mlret.evaluate --out writes")
    cli.check_model_folder(prog, "--hf", args.hf)
    with cli.user_errors(prog):  # a missing model folder or checkpoint, a value that cannot work
        try:
            out = _export(parser, args, results)
        except storage.StorageError as e:  # a full disk, a bucket that failed: one line, exit 75 (try again)
            print(f"{prog}: {e}", file=sys.stderr, flush=True)
            return storage.EXIT_STORAGE
    print(f"exported to {out}" + (f"; log {log_file}" if log_file else ""))
    return 0


def _export(parser: argparse.ArgumentParser, args: argparse.Namespace,
            results: dict[str, Any] | None) -> epath.Path:
    """The export `main` asked for: from a checkpoint or from a Hugging Face folder / hub id."""
    if args.checkpoint:
        if args.step is not None and args.step < 0:
            parser.error("--step must be >= 0")
        config, model, tokenizer = restore_for_export(args.checkpoint, args.step)
        return export_model(model, tokenizer, config.model, args.out, results=results, run_config=config)
    config = default_config()
    model_dir = resolve_model_dir(args.hf)
    config.model.name = str(model_dir)
    for key, value in st_settings(model_dir).items():
        config.model[key] = value
    for key in ("pooling", "normalize", "query_prefix", "passage_prefix"):
        if getattr(args, key) is not None:
            config.model[key] = getattr(args, key)
    for key in ("query_len", "passage_len"):
        if getattr(args, key) is not None:
            config.data[key] = getattr(args, key)
    model, tokenizer = load_dual_encoder(config)
    config.model.name = args.hf  # the card names what the user asked for, not the cache path
    # Truncation for encode_query / encode_document only when asked for: an unchanged model stays the same.
    lengths = ((tokenizer.query_len, tokenizer.passage_len) if args.query_len or args.passage_len else None)
    return export_model(model, tokenizer, config.model, args.out, results=results, lengths=lengths)


if __name__ == "__main__":
    sys.exit(main())
