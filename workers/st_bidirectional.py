"""Bidirectional attention for an exported embedding model (``train.attention: bidirectional``).

This file is copied verbatim into a sentence-transformers folder that ``repurpose export`` writes for a trial
trained with bidirectional attention, as ``modeling_bidirectional.py``, and named in the folder's config.json
``auto_map``: ``SentenceTransformer(folder, trust_remote_code=True)`` (or ``AutoModel.from_pretrained(folder,
trust_remote_code=True)``) then builds the model from the classes below, which attend bidirectionally. The
folder's ``model_type`` is ``bidirectional_<family>``, a name transformers does not know: without
``trust_remote_code=True`` it refuses to load the folder instead of building the family's causal model from it. It
imports only ``transformers`` and the family's own modules, never ``repurpose``: the folder loads where repurpose
is not installed.

How (the same as training's workers/packing.py ``make_bidirectional``): transformers builds each family's attention
mask in the model's forward with ``masking_utils.create_causal_mask``, whose ``or_mask_function`` is overlaid on
the causal mask. Overlaid with "every key" the causal part is gone, while the padding mask still applies after it:
every token attends to every real token of its own text. The family module's ``create_causal_mask`` is wrapped
once and overlays only inside a forward of one of these classes, so other models in the process stay causal.
"""
from __future__ import annotations

import contextvars
import functools
import importlib

from transformers.masking_utils import or_masks

# True inside the forward of a model of this file
_BIDIRECTIONAL = contextvars.ContextVar("bidirectional_embedding_forward", default=False)


def _every_key(batch_idx, head_idx, q_idx, kv_idx):
    return kv_idx >= 0


def overlay(module, flag: contextvars.ContextVar) -> None:
    """Wrap ``module.create_causal_mask`` to overlay "every key" while ``flag`` is true, unless a wrapper reading
    ``flag`` is already in its chain. Per flag: transformers executes this file again for every folder it loads it
    from, each time with a new ``_BIDIRECTIONAL`` (a wrapper of an earlier one would leave a second folder's model
    causal); training (workers/packing.py ``make_bidirectional``) overlays with its own flag."""
    wrapped = module.create_causal_mask
    while wrapped is not None:
        if getattr(wrapped, "__dict__", {}).get("bidirectional_flag") is flag:
            return
        wrapped = getattr(wrapped, "__wrapped__", None)
    create_causal_mask = module.create_causal_mask

    @functools.wraps(create_causal_mask)
    def create_mask(*args, **kwargs):
        if flag.get():
            extra = kwargs.get("or_mask_function")
            kwargs["or_mask_function"] = _every_key if extra is None else or_masks(extra, _every_key)
        return create_causal_mask(*args, **kwargs)

    create_mask.bidirectional_flag = flag
    module.create_causal_mask = create_mask


def model_type(family: str) -> str:
    """The folder's config.json ``model_type``: not one transformers knows (see above)."""
    return f"bidirectional_{family}"


def _bidirectional(family: str, base_name: str) -> tuple[type, type]:
    """(config class, model class): subclasses of the family's (e.g. GPTNeoXConfig, GPTNeoXModel) under
    ``model_type(family)``, the model's forward attending bidirectionally."""
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    base = getattr(module, base_name)
    overlay(module, _BIDIRECTIONAL)

    class Config(base.config_class):
        pass

    Config.model_type = model_type(family)

    class Model(base):
        config_class = Config

        def forward(self, *args, **kwargs):
            token = _BIDIRECTIONAL.set(True)
            try:
                return super().forward(*args, **kwargs)
            finally:
                _BIDIRECTIONAL.reset(token)

    for cls, name in ((Config, CLASSES[family][0]), (Model, CLASSES[family][1])):
        cls.__name__ = cls.__qualname__ = name
    return Config, Model


# config.json's auto_map names these (``AutoConfig``, ``AutoModel``): the classes of the folder's family
CLASSES = {"gpt_neox": ("BidirectionalGPTNeoXConfig", "BidirectionalGPTNeoXModel"),
           "llama": ("BidirectionalLlamaConfig", "BidirectionalLlamaModel"),
           "qwen2": ("BidirectionalQwen2Config", "BidirectionalQwen2Model"),
           "qwen3": ("BidirectionalQwen3Config", "BidirectionalQwen3Model"),
           "olmo2": ("BidirectionalOlmo2Config", "BidirectionalOlmo2Model")}


def __getattr__(name: str):
    """A class named in CLASSES, built on first use (only the folder's family is imported)."""
    for family, names in CLASSES.items():
        if name in names:
            classes = _bidirectional(family, names[1].removeprefix("Bidirectional"))
            globals().update(zip(names, classes))
            return globals()[name]
    raise AttributeError(name)
