"""The offline mini suite, pretrained here: small GPT-NeoX (Pythia) and Llama LMs and their data for an offline
`repurpose demo`.

The study repurposes *pretrained* LMs (docs/study.md: the Pythia suite). Without a network there is no hub, so
this module makes a suite on the spot, from text every Python carries (stdlib_pairs.py):

1. a byte-level BPE tokenizer (GPT-NeoX's special tokens: ``<|endoftext|>`` = 0, ``<|padding|>`` = 1),
   trained on the stdlib corpus with ``tokenizers``;
2. four GPT-NeoX models with Pythia's shape rules (intermediate = 4 * hidden, rotary on 25 % of each head,
   parallel residual, head dim 32 like pythia-14m/31m; the two largest have exactly pythia-14m's and
   pythia-31m's blocks, so the same non-embedding N), spanning 47x in N; and a second family (``family="llama"``),
   four Llama-architecture models (RMSNorm, SwiGLU MLP, full RoPE, grouped-query attention, no biases: the
   SmolLM2 / Llama 3.x block) of the same widths and depths, pretrained the same way on the same tokens;
3. causal-LM pretraining of each (AdamW, warmup + cosine, bf16 autocast on CPU), the same token order for
   all (as in Pythia), tokens growing with N;
4. ``save_pretrained`` of the backbone (``GPTNeoXModel``: what ``AutoModel`` loads, no LM head) with the
   tokenizer, and ``repurpose_pretrain_lr`` (core/models.py PRETRAIN_LR_KEY) in config.json so
   ``lr: auto`` works, plus the pretraining loss and tokens.

Everything lives in the user cache dir (``$REPURPOSE_CACHE`` or ``platformdirs.user_cache_dir("repurpose")``)
under ``suite/<key>``, one key per family, a hash of that family's definition and the code/data versions (a
content-addressed cache): a second ``build_suite`` finds the models and returns at once. Each model is
written to a temporary directory and renamed into place, so a half-built model is never listed.

The modules: ``models`` (the two series' shapes and configs, what a built model records), ``stdlib_pairs``
(contrastive pairs and the pretraining corpus from the standard library), ``pretraining`` (tokenizer, token
order, the causal-LM loop), ``cache`` (building, finding and publishing the suite and the demo's pairs). The
`repurpose suite` commands are orchestrator/suite_commands.py.
"""
