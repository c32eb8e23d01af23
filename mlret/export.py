"""Export a dual encoder to a folder that `transformers.AutoModel` and `sentence_transformers.SentenceTransformer`
load with no extra code: config.json, model.safetensors (HF names), the tokenizer files, the
sentence-transformers modules (`modules.json`, `1_Pooling/`, `2_Dense/` for pooler pooling, `Normalize`),
`config_sentence_transformers.json` with the query / passage prompts, and a README.md model card.

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
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.numpy import save_file

import mlret
from mlret.models import DualEncoder, Encoder, TextTokenizer, encoder_to_tensors

PASSAGE_TOWER_DIR = "passage_tower"
# sentence-transformers' Tanh, by the import path its Dense module accepts without trust_remote_code.
_TANH = "torch.nn.modules.activation.Tanh"


def export_model(model: DualEncoder, tokenizer: TextTokenizer, model_config: Any, out_dir: str | os.PathLike[str],
                 *, results: Mapping[str, Any] | None = None) -> Path:
    """Write `model` (parameters in memory) as a HF + sentence-transformers folder; returns out_dir.

    model_config is `config.model` (its name and prefixes are recorded); results, when given, is a mapping
    {benchmark or metric: value or {metric: value}} shown in the model card.
    """
    out = Path(out_dir)
    towers = [("query", model.towers.query, out)]
    if not model.tied:
        towers.append(("passage", model.towers.passage, out / PASSAGE_TOWER_DIR))
    for role, encoder, folder in towers:
        _write_folder(encoder, tokenizer, model, model_config, folder, role=role, results=results)
    return out


def _write_folder(encoder: Encoder, tokenizer: TextTokenizer, model: DualEncoder, model_config: Any, out: Path, *,
                  role: str, results: Mapping[str, Any] | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cfg = encoder.cfg
    (out / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2, sort_keys=True) + "\n")
    save_file(encoder_to_tensors(encoder), str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(out)

    # sentence-transformers: Transformer -> Pooling -> (Dense tanh for pooler pooling) -> (Normalize).
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    _write_json(out / "sentence_bert_config.json",
                {"max_seq_length": max(tokenizer.query_len, tokenizer.passage_len), "do_lower_case": False})
    _write_json(out / "1_Pooling" / "config.json", {
        "word_embedding_dimension": cfg.hidden_size,
        "pooling_mode_cls_token": model.pooling in ("cls", "pooler"),
        "pooling_mode_mean_tokens": model.pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
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
        "prompts": {"query": tokenizer.query_prefix, "passage": tokenizer.passage_prefix},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine" if model.normalize else "dot",
    })
    (out / "README.md").write_text(model_card(model, tokenizer, model_config, role=role, results=results))


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def model_card(model: DualEncoder, tokenizer: TextTokenizer, model_config: Any, *, role: str = "query",
               results: Mapping[str, Any] | None = None) -> str:
    """A README.md for the exported folder: what it is, how to use it, and its evaluation results."""
    cfg = model.towers.query.cfg
    base = str(getattr(model_config, "name", "") or "unknown")
    qp, pp = tokenizer.query_prefix, tokenizer.passage_prefix
    lines = [
        "---",
        "library_name: sentence-transformers",
        "pipeline_tag: sentence-similarity",
        "tags: [sentence-transformers, feature-extraction, dense-retrieval, multilingual, mlret]",
        "---",
        "",
        f"# Dense retriever ({cfg.architecture}) exported by mlret {mlret.__version__}",
        "",
        f"Dual encoder fine-tuned or re-exported by [mlret](https://arxiv.org/abs/2408.10536) from `{base}`.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| architecture | {cfg.architecture}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_heads} heads |",
        f"| pooling | {model.pooling} |",
        f"| L2-normalised | {model.normalize} (similarity: {'cosine' if model.normalize else 'dot product'}) |",
        f"| towers | {'tied (one encoder)' if model.tied else 'untied (separate query and passage encoders)'} |",
        f"| query prefix / prompt `query` | {json.dumps(qp)} |",
        f"| passage prefix / prompt `passage` | {json.dumps(pp)} |",
        f"| max length (query / passage) | {tokenizer.query_len} / {tokenizer.passage_len} tokens |",
        "",
    ]
    if not model.tied:
        lines += [
            f"**Untied towers.** This folder holds the **{role}** encoder. "
            + (f"The passage encoder is the complete model in `{PASSAGE_TOWER_DIR}/`: encode queries with this "
               f"folder and passages with `{PASSAGE_TOWER_DIR}/`." if role == "query" else
               "The query encoder is the folder above this one."),
            "",
        ]
    lines += [
        "## Usage",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        'model = SentenceTransformer("PATH")',
        'q = model.encode(["how many people live in Berlin?"], prompt_name="query")',
        'p = model.encode(["Berlin has about 3.7 million inhabitants."], prompt_name="passage")',
        "scores = model.similarity(q, p)",
        "```",
        "",
        f"With `transformers.AutoModel`, prepend the prefixes yourself and apply {model.pooling} pooling"
        + (" and L2 normalisation" if model.normalize else "") + " to `last_hidden_state`"
        + (" (`pooler_output` is the pooled vector)." if model.pooling == "pooler" else "."),
        "",
    ]
    lines += ["## Evaluation", ""]
    if results:
        lines += _results_table(results)
    else:
        lines += ["No evaluation results were given to the export."]
    lines.append("")
    return "\n".join(lines)


def _results_table(results: Mapping[str, Any]) -> list[str]:
    """{name: value} or {benchmark: {metric: value}} as a markdown table."""
    rows = []
    for name, value in results.items():
        if isinstance(value, Mapping):
            rows += [(name, metric, v) for metric, v in value.items()]
        else:
            rows.append(("", name, value))
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    return ["| benchmark | metric | value |", "|---|---|---|", *(f"| {b} | {m} | {fmt(v)} |" for b, m, v in rows)]


# ---------------------------------------------------------------------------------------------- CLI


def _st_defaults(model_dir: Path) -> dict[str, Any]:
    """Pooling, normalisation and prompts of a sentence-transformers folder, to keep them when re-exporting."""
    out: dict[str, Any] = {}
    pooling = model_dir / "1_Pooling" / "config.json"
    if pooling.is_file():
        p = json.loads(pooling.read_text())
        mode = p.get("pooling_mode")
        if mode is None:
            mode = "cls" if p.get("pooling_mode_cls_token") else "mean" if p.get("pooling_mode_mean_tokens") else None
        if mode in ("cls", "mean"):
            out["pooling"] = mode
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
        if "passage" in prompts:
            out["passage_prefix"] = prompts["passage"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlret.export", description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="Hugging Face hub id or local model folder to re-export through mlret")
    src.add_argument("--checkpoint", help="a training run directory (orbax checkpoints)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--results", help="JSON file of evaluation results to put in the model card (the --out "
                        "file of `python -m mlret.evaluate`: its per-evaluator `summary` block is used)")
    g = parser.add_argument_group("--hf only (defaults: the source folder's sentence-transformers settings, "
                                  "else mlret's config defaults)")
    g.add_argument("--pooling", choices=("cls", "mean", "pooler"))
    g.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--query_prefix")
    g.add_argument("--passage_prefix")
    g.add_argument("--query_len", type=int)
    g.add_argument("--passage_len", type=int)
    args = parser.parse_args(argv)
    results = None
    if args.results:
        results = json.loads(Path(args.results).read_text())
        # mlret.evaluate nests {"summary": {evaluator: {metric: value}}, "results": {...full detail...}}.
        results = results.get("summary", results)

    if args.checkpoint:
        if args.step is not None and args.step < 0:
            parser.error("--step must be >= 0")
        try:
            from mlret.checkpoint import restore_for_export
        except ImportError as e:
            print(f"mlret.export: --checkpoint needs mlret.checkpoint.restore_for_export ({e})", file=sys.stderr)
            return 2
        config, model, tokenizer = restore_for_export(args.checkpoint, args.step)
        out = export_model(model, tokenizer, config.model, args.out, results=results)
    else:
        from mlret.config import default_config
        from mlret.models import load_dual_encoder, resolve_model_dir

        config = default_config()
        model_dir = resolve_model_dir(args.hf)
        config.model.name = str(model_dir)
        for key, value in _st_defaults(model_dir).items():
            config.model[key] = value
        for key in ("pooling", "normalize", "query_prefix", "passage_prefix"):
            if getattr(args, key) is not None:
                config.model[key] = getattr(args, key)
        for key in ("query_len", "passage_len"):
            if getattr(args, key) is not None:
                config.data[key] = getattr(args, key)
        model, tokenizer = load_dual_encoder(config)
        config.model.name = args.hf  # the card names what the user asked for, not the cache path
        out = export_model(model, tokenizer, config.model, args.out, results=results)
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
