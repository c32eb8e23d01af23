"""Evaluate a trained run or a Hugging Face model on the configured benchmarks.

    python -m mlret.evaluate --config configs/eval_xquad_r.py --hf sentence-transformers/all-MiniLM-L6-v2 \\
        --out results/minilm.json [--config.eval.xquad_r.candidate_context=paragraph ...]
    python -m mlret.evaluate --config configs/x.py --checkpoint RUN_DIR [--step N] --out F.json

`--hf` loads a model folder or hub id through `mlret.models.load_dual_encoder`. A sentence-transformers folder
supplies its own settings, as sentence-transformers would use them: pooling, normalisation, the `query` and
`document` prompts (as `config.model.query_prefix` / `passage_prefix`) and `max_seq_length` (as the query and
passage lengths, at most the model's positions); a `--config.model.*` / `--config.data.*_len` flag on the command
line overrides the folder, and what was taken from it is logged. A plain transformers folder uses `config.model`.
`--checkpoint` restores a training run (`mlret.checkpoint.restore_for_export`, the
latest step unless `--step`); the run's own config supplies the model, and `--config` (optional then) supplies
the `eval` section. Every evaluator option is a config field (`config.eval.*`), overridable on the command line.

Prints one table and writes F.json: {"summary": {evaluator: {metric: value}}, "results": {evaluator: block},
"per_query": {evaluator: {setting: {"ids", "languages", ["targets"], "values": {metric: [...]}}}}, "source": ...,
"eval_config": ...}; each block has a flat `summary` (`EvalResult.block()`), "per_query" the values it averages
(`EvalResult.per_query`). Matrices and heatmaps go to `config.eval.output_dir` (default: F's name without .json,
plus "_files").
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from mlret import cli, storage
from mlret.console import route_logging
from mlret.eval import EvalResult, build_evaluators, format_table, run_evaluators
from mlret.eval.base import write_json
from mlret.preflight import check_data

# jax (mlret.config, .parallel, .checkpoint, .eval.encode, .export) and transformers (mlret.models) are imported
# inside the functions that use them ("# lazy: jax-free start-up"): --help and a user's mistake are one line before
# jax starts, and `main` routes logging before transformers is imported (mlret.console.route_logging).

_FLAGS: dict[str, Any] = {}


def _define_flags() -> None:
    """Defined only when run as a program: absl flags are global, and mlret.train defines --config too, so
    importing this module (for `evaluate()`) must not define any."""
    _FLAGS.update(
        config=config_flags.DEFINE_config_file("config", None, "config file (ml_collections, get_config())"),
        hf=flags.DEFINE_string("hf", None, "Hugging Face hub id or local model folder"),
        checkpoint=flags.DEFINE_string("checkpoint", None, "training run directory (orbax checkpoints)"),
        step=flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)"),
        out=flags.DEFINE_string("out", None, "where to write the results JSON"),
        distributed=flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host runs)"),
        verbose=flags.DEFINE_bool("verbose", False, "library INFO messages on the terminal too; they always go to "
                                  "the log file beside --out (F.log)"),
    )


def load_model(config: Any, hf: str | None, checkpoint: str | None, step: int | None):
    """(config, model, model_dir_or_tokenizer_path, source) for --hf or --checkpoint."""
    if checkpoint:
        from mlret.checkpoint import restore_for_export  # lazy: jax-free start-up

        run_config, model, tokenizer = restore_for_export(checkpoint, step)
        if config is None:
            config = run_config
        else:
            # The run decides what the model is; the given config decides how to evaluate it.
            eval_section = config.eval
            config = run_config
            with config.unlocked():
                config.eval = eval_section
        source = {"checkpoint": str(storage.path(checkpoint, "--checkpoint")), "step": step}
        return config, model, tokenizer.name_or_path, source
    from mlret.config import default_config  # lazy: jax-free start-up
    from mlret.models import load_dual_encoder, resolve_model_dir  # lazy: jax-free start-up

    config = default_config() if config is None else config
    config.model.name = hf
    model_dir = str(resolve_model_dir(hf))
    apply_st_settings(config, model_dir, flags_given(sys.argv))
    model, _ = load_dual_encoder(config)
    return config, model, model_dir, {"hf": hf}


def flags_given(argv: list[str]) -> set[str]:
    """The config fields set by `--config.<field>=...` flags on the command line ("model.query_prefix", ...)."""
    return {a.split("=", 1)[0].removeprefix("--config.") for a in argv if a.startswith("--config.")}


def apply_st_settings(config: Any, model_dir: str, given: set[str] = frozenset()) -> dict[str, Any]:
    """Set `config.model`'s pooling, normalisation and prefixes, `config.data`'s lengths and the trained Matryoshka
    dimensions (`config.loss.matryoshka_dims`, which `config.eval.dims="auto"` reports) from a sentence-transformers
    folder (`export.st_settings`, `max_seq_length` of sentence_bert_config.json, `matryoshka_dims` of
    config_sentence_transformers.json), except the fields in `given` (set on the command line). Returns what was
    applied (also logged)."""
    from mlret.export import st_settings  # lazy: jax-free start-up
    from mlret.models.encoder_config import local_max_length  # lazy: jax-free start-up

    folder = storage.path(model_dir)
    applied = {f"model.{k}": v for k, v in st_settings(folder).items()}
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():
        length = json.loads(st_config.read_text()).get("max_seq_length")
        if length:
            limit = local_max_length(model_dir)
            length = min(int(length), limit[0]) if limit else int(length)
            applied.update({"data.query_len": length, "data.passage_len": length})
    st_model = folder / "config_sentence_transformers.json"
    if st_model.is_file() and (dims := json.loads(st_model.read_text()).get("matryoshka_dims")):
        # The dimensions an mlret export says it trained: config.eval.dims="auto" reports the metrics at each.
        applied["loss.matryoshka_dims"] = ",".join(str(int(d)) for d in dims)
    applied = {k: v for k, v in applied.items() if k not in given}
    for key, value in applied.items():
        section, field = key.split(".")
        config[section][field] = value
    if applied:
        logging.getLogger(__name__).info("%s: sentence-transformers settings %s", model_dir,
                                         ", ".join(f"{k}={v!r}" for k, v in applied.items()))
    return applied


def evaluate(config: Any, *, hf: str | None = None, checkpoint: str | None = None, step: int | None = None,
             out: str | None = None) -> dict[str, Any]:
    """Load, encode on the mesh, run the configured evaluators; write `out` when given. Returns the JSON dict."""
    from mlret import config as config_lib  # lazy: jax-free start-up
    from mlret import parallel  # lazy: jax-free start-up
    from mlret.eval.encode import eval_tokenizer, make_embedder, place_model  # lazy: jax-free start-up

    if config is not None:
        config_lib.validate(config)
    config, model, model_dir, source = load_model(config, hf, checkpoint, step)
    config_lib.validate(config)
    check_data(config, sources=False)  # every evaluation file there, before anything compiles
    evaluators = build_evaluators(config)  # reads nothing yet; fails on a bad field before device work
    mesh = parallel.make_mesh(config.mesh)
    rules = parallel.parse_rules(config.mesh.rules)
    model = place_model(model, mesh, rules)
    embedder = make_embedder(model, config, mesh, eval_tokenizer(config, model_dir))
    output_dir = config.eval.output_dir or (os.path.splitext(out)[0] + "_files" if out else None)
    t0 = time.perf_counter()
    results = run_evaluators(evaluators, embedder, step=step, output_dir=output_dir)
    report = {
        "summary": {name: r.summary for name, r in results.items()},
        "results": {name: r.block() for name, r in results.items()},
        "per_query": {name: {s: pq.to_json() for s, pq in r.per_query.items()} for name, r in results.items()},
        "source": source,
        "model": {k: config.model[k] for k in ("name", "pooling", "normalize", "query_prefix", "passage_prefix")},
        "eval_config": config.eval.to_dict(),
        "lengths": {"query_len": embedder.tokenizer.query_len, "passage_len": embedder.tokenizer.passage_len},
        "seconds": time.perf_counter() - t0,
    }
    if out:
        import jax  # lazy: jax-free start-up

        if jax.process_index() == 0:
            write_json(out, report)
    return report


def main(argv: list[str]) -> None:
    f = {k: v.value for k, v in _FLAGS.items()}
    prog = "mlret.evaluate"
    if len(argv) > 1:
        cli.fail(prog, f"unexpected arguments {argv[1:]}; overrides look like --config.eval.batch_size=64")
    if bool(f["hf"]) == bool(f["checkpoint"]):
        cli.fail(prog, "give exactly one of --hf PATH_OR_ID and --checkpoint RUN_DIR")
    if f["hf"] and f["config"] is None:
        cli.fail(prog, "--hf needs --config (it says how to pool, normalise and which benchmarks to run)")
    if f["step"] is not None and not f["checkpoint"]:
        cli.fail(prog, "--step goes with --checkpoint")
    if not f["out"]:
        cli.fail(prog, "--out F.json is required")
    cli.check_model_folder(prog, "--hf", f["hf"])
    log_file = cli.log_path(f["out"])
    route_logging(log_file, "info" if f["verbose"] else "warning")  # before transformers is imported
    from mlret import parallel  # lazy: jax-free start-up
    from mlret.config import default_config  # lazy: jax-free start-up

    if f["distributed"]:
        parallel.initialize_distributed()
    # The evaluation config's field (a --checkpoint run without --config: the default cache).
    parallel.enable_compilation_cache((f["config"] or default_config()).train.compilation_cache_dir)
    which = f["config"].eval.evaluators if f["config"] is not None else "the run's evaluators"
    print(f"evaluating {f['hf'] or f['checkpoint']} on {which}" + (f" (log {log_file})" if log_file else "") + " ...",
          flush=True)
    with cli.user_errors(prog):  # a missing model folder, checkpoint or data file; a field that cannot work
        report = evaluate(f["config"], hf=f["hf"], checkpoint=f["checkpoint"], step=f["step"], out=f["out"])
    print(format_table({name: EvalResult(block["summary"], details=block, step=block["step"])
                        for name, block in report["results"].items()}))
    print(f"wrote {f['out']}" + (f"; log {log_file}" if log_file else ""))



if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=cli.flags_parser("mlret.evaluate"))
