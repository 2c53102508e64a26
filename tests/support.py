"""Test helpers shared across packages: BGE-format pairs, a locally trained byte-level BPE tokenizer and a tiny
GPT-NeoX checkpoint. Nothing downloads: the tokenizer is trained here, the model is built from a config."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import socket

WORDS = (
    "river stone cloud lamp garden window forest engine silver paper candle bridge harbor violin mountain "
    "thunder copper meadow lantern orchard desert glacier compass falcon marble velvet canyon ember prism"
).split()
COLORS = "red green blue yellow black white purple orange".split()


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    """Related query/positive pairs: the positive restates the query's facts in other words."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a, b = rng.sample(WORDS, 2)
        c = rng.choice(COLORS)
        k = rng.randint(2, 9)
        query = f"what colour is the {a} near the {b}?"
        pos = f"the {a} beside the {b} is {c}, and {k} more {a}s " + " ".join(rng.choices(WORDS, k=rng.randint(3, 25)))
        pairs.append({"query": query, "pos": [pos], "neg": [f"a {b} is not a {a}"]})
    return pairs


def write_jsonl(path, pairs) -> str:
    with open(path, "w") as f:
        for p in pairs:
            f.write((p if isinstance(p, str) else json.dumps(p)) + "\n")
    return str(path)


def build_tokenizer(out_dir, texts, vocab_size: int = 512):
    """Byte-level BPE with GPT-NeoX's special tokens, loadable by AutoTokenizer (no pad token: the worker
    must fall back to EOS)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_model(out_dir, *, hidden=64, layers=4, heads=4, vocab=512, pretrain_lr=1e-3, seed=0):
    import torch
    from transformers import AutoModel, GPTNeoXConfig

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hidden, max_position_embeddings=256, rotary_pct=0.25,
                        eos_token_id=0, bos_token_id=0)
    cfg.repurpose_pretrain_lr = pretrain_lr
    AutoModel.from_config(cfg).save_pretrained(out_dir)
    return out_dir


# --- tiny checkpoints of every supported decoder family (tests/workers/test_families.py, the cross-family sweep)
VOCAB = 512
_COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB, use_cache=False,
               bos_token_id=0, eos_token_id=0, pad_token_id=1)
_GQA = dict(num_key_value_heads=2, intermediate_size=48)


def tiny_config(family: str):
    """A 2-block, 32-wide model of ``family``; 2 KV heads of 4 (GQA), head_dim 12 (not 32/4) where it is free."""
    import transformers as T

    return {
        "gpt_neox": lambda: T.GPTNeoXConfig(**_COMMON, intermediate_size=128, rotary_pct=0.25),
        "llama": lambda: T.LlamaConfig(**_COMMON, **_GQA),
        "mistral": lambda: T.MistralConfig(**_COMMON, **_GQA),
        "qwen2": lambda: T.Qwen2Config(**_COMMON, **_GQA),
        "qwen3": lambda: T.Qwen3Config(**_COMMON, **_GQA, head_dim=12),
        "gemma2": lambda: T.Gemma2Config(**_COMMON, **_GQA, head_dim=12),
        "gemma3_text": lambda: T.Gemma3TextConfig(**_COMMON, **_GQA, head_dim=12),
        "olmo2": lambda: T.Olmo2Config(**_COMMON, **_GQA),
        "phi3": lambda: T.Phi3Config(**_COMMON, **_GQA),
    }[family]()


def build_family_checkpoint(out_dir, family: str, tokenizer, seed: int = 0) -> str:
    """A tiny ``family`` model (``tiny_config``) saved with ``tokenizer`` beside it, as a hub checkpoint is."""
    import torch
    from transformers import AutoModel

    torch.manual_seed(seed)
    AutoModel.from_config(tiny_config(family)).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


# --- the uninterrupted reference of a driver test's trial
def clean_run(grid_path: str, trial_id: str) -> dict:
    """The trial run in this process, from scratch, without checkpoints, single-threaded as on a 1-CPU worker."""
    import torch

    from orchestrator.grid import load_grid
    from orchestrator.plan import plan_grid
    from workers.trial import run_trial

    (planned,) = [t for t in plan_grid(load_grid(grid_path), strict_data=True).trials if t.trial_id == trial_id]
    threads = torch.get_num_threads()
    try:
        return run_trial(dataclasses.replace(planned.spec, num_threads=1))
    finally:
        torch.set_num_threads(threads)


# --- the packages the project installs
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def package_files() -> list[str]:
    """Every Python file of every package the project installs (pyproject.toml's ``packages.find`` include), found
    by walking them: a file added later is covered without a test changing."""
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        include = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]
    roots = sorted({pattern.rstrip("*").rstrip(".") for pattern in include})
    return [os.path.join(root, name) for top in roots for root, _, names in os.walk(os.path.join(REPO, top))
            for name in sorted(names) if name.endswith(".py")]


def package_modules() -> list[str]:
    """The dotted names of ``package_files``."""
    names = [os.path.relpath(f, REPO)[:-3].replace(os.sep, ".") for f in package_files()]
    return sorted(n.removesuffix(".__init__") for n in names)


# --- time that passes without waiting
class FakeClock:
    """A clock a test moves by hand (``advance``): code that takes a ``clock`` (orchestrator/lease.py) sees time
    pass without the test sleeping."""

    def __init__(self, start_s: float = 1_700_000_000.0):
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


# --- S3 in this process: one moto server for the session (the `moto_s3` fixture, tests/conftest.py)
MOTO_KEY = "testing"  # moto checks no signature: any key pair is accepted


class MotoS3:
    """A moto S3 server on a free 127.0.0.1 port, a thread of this process. ``env`` points a process at it (the
    variables pyarrow, boto3 and fsio read); ``client`` is a boto3 client; ``reset`` empties it."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        _fix_moto_complete_multipart()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{port}"

    def env(self, key_id: str = MOTO_KEY, secret: str = MOTO_KEY) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self, key_id: str = MOTO_KEY, secret: str = MOTO_KEY):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=key_id,
                            aws_secret_access_key=secret)

    def reset(self, *buckets: str) -> None:
        """Every bucket and object gone, then ``buckets`` created empty."""
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")).read()
        client = self.client()
        for name in buckets:
            client.create_bucket(Bucket=name)

    def stop(self) -> None:
        self.server.stop()


def _fix_moto_complete_multipart() -> None:
    """moto 5.2.1 answers CompleteMultipartUpload with the root tag ``CompleteMultipartUploadResponse``
    (getmoto/moto#10055); Arrow's S3 client checks for ``CompleteMultipartUploadResult`` (what S3 sends) and
    retries until it fails. pyarrow writes even a few bytes as a multipart upload, so every store write would fail
    against this moto. Patch the response in this process (the server runs in a thread here)."""
    from moto.s3.responses import S3Response

    if getattr(S3Response, "_repurpose_patched", False):
        return
    original = S3Response._key_response_post

    def patched(self, *args, **kwargs):
        status, headers, body = original(self, *args, **kwargs)
        if isinstance(body, (str, bytes)):
            wrong, right = "CompleteMultipartUploadResponse", "CompleteMultipartUploadResult"
            body = body.replace(wrong, right) if isinstance(body, str) else body.replace(wrong.encode(),
                                                                                          right.encode())
        return status, headers, body

    S3Response._key_response_post = patched
    S3Response._repurpose_patched = True


# --- a trained tiny model per method ---------------------------------------------------------------------------
METHOD_KW = {"full": {}, "freeze": {"trainable_fraction": 0.5}, "bias": {}, "lora": {"lora_rank": 4}}


def trained(tiny_model: str, method: str, seed: int = 0):
    """The tiny model prepared for ``method``, its trainable parameters moved as training would move them."""
    import torch
    from transformers import AutoModel

    from core.spec import LORA_TARGETS
    from workers.methods import select_trainable

    model = AutoModel.from_pretrained(tiny_model, attn_implementation="eager", dtype=torch.float32)
    torch.manual_seed(seed)
    model = select_trainable(model, method, lora_targets=LORA_TARGETS, **METHOD_KW[method])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()
