"""`repurpose export NAME (--trial ID | --budget C) --out DIR`: a trial's model as a sentence-transformers folder.

The folder holds base + kept weights (workers/weights.py; LoRA merged into the base Linears) as a plain
transformers checkpoint, and sentence-transformers' modules: Transformer -> Pooling in the trial's mode -> Normalize,
so ``SentenceTransformer(DIR)`` loads it offline and embeds as the trial did:

    trial pooling   sentence-transformers Pooling   what the saved tokenizer does (the trial's data path)
    mean            "mean"                          the text's tokens, no special tokens (make_encoder)
    last            "lasttoken"                     the text's tokens cut to max_length - 1, then the EOS
                                                    (workers/pooling.append_eos): the tokenizer's post-processor
                                                    appends the EOS, and its truncation keeps room for it
    weighted_mean   "weightedmean"                  as mean; weights i = 1..n over real tokens (SGPT)

Padding is on the right, as in training; ``max_seq_length`` is the sweep's ``train.max_length``. Before the folder
takes its name, the export reloads it and checks that its tokenizer gives the trial's token ids on sample texts
(the one part a family's tokenizer could get wrong: a BOS it adds, a post-processor it rebuilds).

A trial trained with ``train.attention: bidirectional``: the folder also holds workers/st_bidirectional.py as
``modeling_bidirectional.py``, and config.json names its classes (``auto_map``) under a ``model_type`` of its own,
so ``SentenceTransformer(DIR, trust_remote_code=True)`` embeds bidirectionally, as the trial did, and without
``trust_remote_code`` the folder refuses to load rather than embed causally (``add_bidirectional``; the README says
so).

Which trial: the one named, or at ``--budget C`` the empirical best (analysis/trial_choice.py; the CLI asks
analysis and passes the row here: workers never import analysis). Bad input is one line and exit 2 with nothing
written: an unknown sweep or trial, a trial that did not complete or kept no weights, a budget not in the grid, an
``--out`` that exists and is not an empty directory. The folder is built under a temporary name beside DIR and
renamed into place: it appears whole or not at all.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import fsio as storage
from core.errors import UserError
from core.spec import ATTENTIONS, default
from core.store import GRID_FILE, StoreError, sweep_uri
from core.store import model_uri
from workers.weights import read_manifest

# the trial's pooling -> sentence-transformers' Pooling mode
ST_POOLING = {"mean": "mean", "last": "lasttoken", "weighted_mean": "weightedmean"}
CHECK_TEXTS = ("What colour is the lamp near the river?",
               "def embed(model, ids, mask):\n    return model(ids, mask).last_hidden_state.mean(1)",
               "A long text, longer than any max_length: " + "the river runs past the old stone bridge " * 40)


class ExportError(UserError):
    """An export that cannot be made; the message names what is wrong."""


def quiet_model_loading() -> None:
    """The CLI loads models in its own process here: no library noise the user did not ask for — transformers'
    per-load progress bars, and DeepSpeed's "unable to detect [an accelerator]" warning, which its import (pulled
    in by transformers' model loading through accelerate) prints on a machine without a GPU."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def export_command(args, row: dict, grid: dict) -> int:
    """args: name, out, storage; ``row``: the store's row of the trial to export (analysis/trial_choice.py picks
    it); ``grid``: the sweep's resolved grid (``read_grid``)."""
    quiet_model_loading()
    sweep = sweep_uri(args.storage, args.name)
    out = check_out(args.out)
    weights = model_uri(sweep, row["trial_id"])
    if read_manifest(weights) is None:
        raise ExportError(f"{args.name}: trial {row['trial_id']} kept no weights ({storage.redact(weights)} has no "
                          "finished save; run.keep_weights: none, or a sweep from before weights were kept)")
    max_length = int((grid.get("train") or {}).get("max_length") or default("max_length"))
    pooling = row.get("pooling") or "mean"  # a store from before the pooling axis: the study's mean
    attention = row.get("attention") or "causal"  # a store from before the attention axis: causal
    export_model(row["model"], weights, pooling, max_length, out, query_instruction=row.get("query_instruction") or "",
                 attention=attention)
    loss = "n/a" if row.get("eval_loss") is None else f"{row['eval_loss']:.4f}"
    print(f"exported trial {row['trial_id']} ({row['method']}, {row['model']}, pooling {pooling}, budget "
          f"{row['budget_flops']:.3g} FLOP, eval_loss {loss}) to {out}", file=sys.stderr)
    if attention == "bidirectional":
        print(f"it attends bidirectionally: load it with SentenceTransformer({out!r}, trust_remote_code=True)",
              file=sys.stderr)
    return 0


# --- reading the sweep --------------------------------------------------------------------------------------
def read_grid(sweep: str, name: str) -> dict:
    """The sweep's resolved grid (grid.yaml's ``grid``); a StoreError when there is no such sweep."""
    import yaml

    path = storage.join(sweep, GRID_FILE)
    if not storage.exists(path):
        raise StoreError(f"{storage.redact(sweep)}: no sweep named {name!r} (no {GRID_FILE})")
    doc = yaml.safe_load(storage.read_bytes(path).decode())
    return (doc or {}).get("grid") or {}


def check_out(out: str) -> str:
    """``--out`` as an absolute local path that does not exist or is an empty directory."""
    if storage.is_remote(out):
        raise ExportError(f"--out {storage.redact(out)}: must be a local directory (copy the folder after)")
    path = os.path.abspath(out.removeprefix("file://"))
    if os.path.exists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        raise ExportError(f"--out {out}: exists and is not an empty directory")
    return path


# --- building the folder ------------------------------------------------------------------------------------
def export_model(base_model: str, weights_uri: str, pooling: str, max_length: int, out: str, *,
                 query_instruction: str = "", attention: str = "causal") -> None:
    """Writes the sentence-transformers folder ``out`` (absent or empty) from ``base_model`` + the kept weights.
    A trial's query instruction becomes the folder's prompt ``query``: ``encode(queries, prompt_name="query")``
    prepends it to each query as the trial did (as text, then tokenised and truncated to max_length).
    ``attention="bidirectional"``: the folder's model attends bidirectionally (``add_bidirectional``), loaded with
    ``trust_remote_code=True``."""
    if pooling not in ST_POOLING:
        raise ExportError(f"pooling {pooling!r}: no sentence-transformers mode for it ({', '.join(ST_POOLING)})")
    if attention not in ATTENTIONS:
        raise ExportError(f"attention {attention!r}: not one of {', '.join(ATTENTIONS)}")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        _build(base_model, weights_uri, pooling, max_length, tmp, query_prompts(query_instruction), attention)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (check_out); a file appearing in it since makes this fail, nothing replaced
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def query_prompts(query_instruction: str) -> dict:
    """The sentence-transformers ``prompts`` of a trial: {"query": its instruction}, none without one."""
    return {"query": query_instruction} if query_instruction else {}


def _build(base_model: str, weights_uri: str, pooling: str, max_length: int, tmp: str, prompts: dict,
           attention: str = "causal") -> None:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from sentence_transformers.base.modules import Normalize, Transformer

    from workers import st_bidirectional
    from workers.weights import load_trained

    model = load_trained(base_model, weights_uri)
    family = model.config.model_type
    if attention == "bidirectional" and family not in st_bidirectional.CLASSES:
        raise ExportError(f"{base_model}: model_type {family!r} has no bidirectional export "
                          f"({', '.join(st_bidirectional.CLASSES)})")
    tokenizer = trial_tokenizer(base_model, pooling, max_length)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    del model
    transformer = Transformer(tmp, max_seq_length=max_length)
    st = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), ST_POOLING[pooling]),
                                      Normalize()], device="cpu", prompts=prompts or None)
    st.save(tmp)
    if attention == "bidirectional":
        add_bidirectional(tmp, family)
    check_tokenizer(tmp, base_model, pooling, max_length)


# --- bidirectional attention --------------------------------------------------------------------------------
# The file copied into a bidirectional trial's folder, and the name config.json's auto_map gives it there.
REMOTE_MODULE = "modeling_bidirectional"
LOADING_NOTE = """
## Bidirectional attention

This model was trained with bidirectional attention (every token attends to every real token of its text, as
LLM2Vec and NV-Embed embed). The folder's `modeling_bidirectional.py`, named in `config.json`'s `auto_map`, builds
the model so; load it with `trust_remote_code=True`:

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("path/to/this/folder", trust_remote_code=True)
```

Without it, transformers refuses to load the folder (its `model_type` is the file's own), rather than build the
family's causal model from it.
"""


def add_bidirectional(folder: str, family: str) -> None:
    """Make the saved folder's model attend bidirectionally when loaded with ``trust_remote_code=True``: the
    module workers/st_bidirectional.py copied in (it imports no repurpose code), config.json's ``model_type`` made
    its own (transformers then refuses the folder without ``trust_remote_code=True`` rather than build the family's
    causal model) and ``auto_map`` naming its classes, and the loading note appended to the model card."""
    from workers import st_bidirectional

    shutil.copyfile(st_bidirectional.__file__, os.path.join(folder, f"{REMOTE_MODULE}.py"))
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config_class, model_class = st_bidirectional.CLASSES[family]
    config["model_type"] = st_bidirectional.model_type(family)
    config["auto_map"] = {"AutoConfig": f"{REMOTE_MODULE}.{config_class}", "AutoModel": f"{REMOTE_MODULE}.{model_class}"}
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    card = os.path.join(folder, "README.md")
    with open(card, "a") as f:
        f.write(LOADING_NOTE)


def trial_tokenizer(base_model: str, pooling: str, max_length: int):
    """The base tokenizer made to produce the trial's ids when called with special tokens (sentence-transformers
    calls it so): no special token for mean / weighted_mean, the EOS appended for last; right padding, pad = EOS
    where there is none (workers/steps.load)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if pooling == "last":
        eos = tokenizer.eos_token
        if eos is None:
            raise ExportError(f"{base_model}: pooling 'last' appends the tokenizer's EOS, and it has none")
        post = TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}",
                                  special_tokens=[(eos, tokenizer.eos_token_id)])
    else:
        post = TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
    tokenizer.backend_tokenizer.post_processor = post
    # transformers' own special-token flags, where the class has them, must not add a BOS / EOS on top
    for flag in ("add_bos_token", "add_eos_token"):
        if hasattr(tokenizer, flag):
            try:
                setattr(tokenizer, flag, False)
            except (AttributeError, ValueError):
                pass
    tokenizer.backend_tokenizer.post_processor = post  # a flag's setter may rebuild it: set it last
    tokenizer.padding_side = "right"
    tokenizer.model_max_length = max_length
    return tokenizer


def trial_ids(base_model: str, pooling: str, max_length: int, texts) -> list[list[int]]:
    """The token ids the trial embeds for ``texts`` (workers/pair_files.make_encoder; for last the text cut to
    max_length - 1 and the EOS appended, workers/pooling.append_eos)."""
    from transformers import AutoTokenizer

    from workers.pair_files import make_encoder

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if pooling != "last":
        return make_encoder(tokenizer, max_length)(list(texts))
    return [ids + [tokenizer.eos_token_id] for ids in make_encoder(tokenizer, max_length - 1)(list(texts))]


def check_tokenizer(folder: str, base_model: str, pooling: str, max_length: int) -> None:
    """The saved folder, reloaded, tokenises sample texts as the trial did (else a bug: nothing is published)."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(folder, device="cpu", local_files_only=True, trust_remote_code=True)
    features = st.preprocess(list(CHECK_TEXTS))
    got = [ids[mask.bool()].tolist() for ids, mask in zip(features["input_ids"], features["attention_mask"])]
    want = trial_ids(base_model, pooling, max_length, CHECK_TEXTS)
    if got != want:
        raise RuntimeError(f"export: the saved tokenizer does not reproduce the trial's token ids for pooling "
                           f"{pooling!r} (first text: {got[0][:12]} vs {want[0][:12]})")
