#!/usr/bin/env python3
"""PyTorch reference benchmark for `loracomp bench --json`.

Times one training (or inference) step of a randomly initialised model of the same shapes loracomp
benchmarks (an encoder classifier, or a T5 / Llama rank classifier), with the same head, pooling, loss and
optimiser settings, and prints one JSON line per configuration with the same fields as loracomp's
`BenchResult`. Two implementations of each model: Hugging Face `transformers` modules (`BertModel`,
`T5ForConditionalGeneration`, `LlamaForCausalLM`), and with `--lean` hand-written torch modules of the same
maths without transformers' module overhead (impl names get a `lean-` prefix). See bench/README.md.

Run with the venv's python, e.g.

    /root/venv/bin/python bench/torch_ref.py --json --n 8 > bench/results/torch-f32.jsonl
"""

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import BertConfig, BertModel

# (layers, heads, hidden); MLP is 4 * hidden. Mirrors src/experiments/bench.rs::workload_config.
ENCODERS = {"minilm": (6, 12, 384), "ref4": (4, 6, 384), "tiny": (2, 4, 64)}
# Generative workloads (rank classification), mirroring src/experiments/bench.rs::{t5_config, llama_config}.
# T5: (vocab, d_model, d_kv, heads, d_ff, layers per stack), gated-GELU, untied head (Flan-T5-small's shape).
T5S = {"t5small": (32128, 512, 64, 6, 1024, 8), "t5tiny": (256, 32, 8, 4, 64, 2)}
# Llama: (vocab, hidden, heads, kv heads, intermediate, layers), SwiGLU, RoPE theta 1e4, untied head.
LLAMAS = {"llama4": (32000, 512, 8, 2, 1376, 4), "llamatiny": (256, 32, 4, 2, 64, 2)}
WORKLOADS = {**ENCODERS, **T5S, **LLAMAS}
# The bank's target projections per model family (PEFT target_modules).
TARGETS = {"bert": ("query", "value"), "t5": ("q", "v"), "llama": ("q_proj", "v_proj")}
ANSWER0 = 10  # class c's answer is [ANSWER0 + c, eos] (T5 eos 1, Llama eos 2), as in bench.rs


def family(workload: str) -> str:
    return "bert" if workload in ENCODERS else "t5" if workload in T5S else "llama"

MODES = ["forward", "lora", "uniform", "learned", "full"]
ATTNS = ["sdpa", "eager"]
LEARNED_IMPLS = ["torch-fair", "torch-authors"]

VOCAB = 30522
TYPE_VOCAB = 2
MAX_POS = 512
BATCH = 16
SEQ = 64
CLASSES = 10
RANK = 8
ALPHA = 16.0
SCALE = ALPHA / RANK  # 2.0, as loracomp's `scale`
LR = 1e-4  # loracomp bench: AdamW { lr: 1e-4, weight_decay: 0, betas (0.9, 0.999), eps 1e-8 }
INIT = 0.05  # bank A/B entries ~ U(-0.05, 0.05), as loracomp's random_bank


# ----------------------------------------------------------------------------------------------- model


def make_bert(workload: str, attn: str) -> BertModel:
    layers, heads, d = ENCODERS[workload]
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * d,
        hidden_act="gelu",  # exact erf GELU
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=MAX_POS,
        type_vocab_size=TYPE_VOCAB,
        layer_norm_eps=1e-12,
        pad_token_id=0,
        attn_implementation=attn,
    )
    bert = BertModel(cfg, add_pooling_layer=False)
    assert bert.config._attn_implementation == attn, bert.config._attn_implementation
    return bert


class Classifier(nn.Module):
    """Encoder -> masked mean pooling over tokens -> linear head."""

    def __init__(self, bert: BertModel):
        super().__init__()
        self.bert = bert
        self.head = nn.Linear(bert.config.hidden_size, CLASSES)

    def forward(self, ids, types, mask):
        h = self.bert(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return self.head(pooled)


def random_bank(n: int, din: int, dout: int, gen: torch.Generator):
    """N frozen rank-RANK modules: A [N, r, in], B [N, out, r]."""
    a = (torch.rand(n, RANK, din, generator=gen) * 2 - 1) * INIT
    b = (torch.rand(n, dout, RANK, generator=gen) * 2 - 1) * INIT
    return a, b


class FairComposed(nn.Module):
    """Learned composition, the efficient way: each step forms
    dW = sum_n softmax(v)_n * s * B_n A_n as ONE matmul [out, N r] x [N r, in], then F.linear(x, W + dW, b)."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        n, r, din = a.shape
        dout = b.shape[1]
        self.r = r
        self.weight = base.weight  # frozen
        self.bias = base.bias  # frozen
        self.register_buffer("a_cat", a.reshape(n * r, din).contiguous())  # rows n*r + j = A_n[j]
        self.register_buffer("b_cat", b.permute(1, 0, 2).reshape(dout, n * r).contiguous())  # cols n*r + j = B_n[:, j]
        self.logits = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        w = torch.softmax(self.logits, 0).repeat_interleave(self.r) * SCALE  # [N r]
        dw = (self.b_cat * w) @ self.a_cat  # [out, in]
        return F.linear(x, self.weight + dw, self.bias)


class AuthorsComposed(nn.Module):
    """Learned composition as the paper authors' code does it: every adapter applied to the input separately,
    out = base(x) + sum_n w_n * s * B_n(A_n(x)), in a Python loop over the N modules (peft-style nn.Linear pairs)."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        n, r, din = a.shape
        dout = b.shape[1]
        self.base = base
        self.lora_A = nn.ModuleList()
        self.lora_B = nn.ModuleList()
        for i in range(n):
            la, lb = nn.Linear(din, r, bias=False), nn.Linear(r, dout, bias=False)
            with torch.no_grad():
                la.weight.copy_(a[i])
                lb.weight.copy_(b[i])
            la.weight.requires_grad_(False)
            lb.weight.requires_grad_(False)
            self.lora_A.append(la)
            self.lora_B.append(lb)
        self.logits = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        w = torch.softmax(self.logits, 0)
        out = self.base(x)
        for i in range(len(self.lora_A)):
            out = out + w[i] * SCALE * self.lora_B[i](self.lora_A[i](x))
        return out


def targets(model: nn.Module, fam: str):
    """(module, attribute) of every target projection (query and value of every attention)."""
    found = []
    for mod in model.modules():
        for attr in TARGETS[fam]:
            if isinstance(getattr(mod, attr, None), nn.Linear):
                found.append((mod, attr))
    assert found, f"no {TARGETS[fam]} projections found"
    return found


def make_generative(workload: str, attn: str):
    """A transformers T5ForConditionalGeneration / LlamaForCausalLM of the workload's shape."""
    if workload in T5S:
        from transformers import T5Config, T5ForConditionalGeneration

        vocab, d, d_kv, heads, d_ff, layers = T5S[workload]
        cfg = T5Config(vocab_size=vocab, d_model=d, d_kv=d_kv, d_ff=d_ff, num_layers=layers,
                       num_decoder_layers=layers, num_heads=heads, feed_forward_proj="gated-gelu",
                       tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
                       eos_token_id=1, attn_implementation=attn)
        return T5ForConditionalGeneration(cfg)
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, d, heads, kv, inter, layers = LLAMAS[workload]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, rms_norm_eps=1e-6, rope_theta=10000.0,
                      tie_word_embeddings=False, attention_dropout=0.0, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2, attn_implementation=attn)
    return LlamaForCausalLM(cfg)


def build(workload: str, attn: str, mode: str, n: int, impl: str, lean: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    fam = family(workload)
    # the lean model holds the transformers model's (random) weights, so both time the same numbers
    if fam == "bert":
        model = Classifier(lean_from_transformers(workload)[1] if lean else make_bert(workload, attn))
    elif lean:
        model = lean_from_transformers(workload)[1]
    else:
        model = make_generative(workload, attn)
    model.eval()  # dropout is 0 anyway; eval for determinism
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed + 1)
    body = model.bert if fam == "bert" else model
    if mode == "forward":
        return model
    if mode == "full":
        if fam == "bert":
            for p in model.parameters():
                p.requires_grad_(True)
        else:  # as loracomp: the body's linear layers; embeddings, norms and the LM head stay frozen
            for name, mod in model.named_modules():
                if isinstance(mod, nn.Linear) and not name.endswith("lm_head"):
                    for p in mod.parameters():
                        p.requires_grad_(True)
    elif mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(TARGETS[fam]))
        body = inject_adapter_in_model(cfg, body)
        if fam == "bert":
            model.bert = body
        else:
            model = body
        for name, p in body.named_parameters():
            p.requires_grad_("lora_" in name)
    elif mode == "uniform":
        # merge the bank uniformly into W once; the timed step is then the frozen model (+ head).
        with torch.no_grad():
            for mod, attr in targets(body, fam):
                lin = getattr(mod, attr)
                a, b = random_bank(n, lin.in_features, lin.out_features, gen)
                lin.weight += (SCALE / n) * torch.einsum("nor,nri->oi", b, a)
    elif mode == "learned":
        cls = {"torch-fair": FairComposed, "torch-authors": AuthorsComposed}[impl]
        for mod, attr in targets(body, fam):
            lin = getattr(mod, attr)
            a, b = random_bank(n, lin.in_features, lin.out_features, gen)
            setattr(mod, attr, cls(lin, a, b))
    else:
        raise ValueError(f"unknown mode {mode!r}")
    if fam == "bert":
        for p in model.head.parameters():
            p.requires_grad_(True)
    return model


# ----------------------------------------------------------------------------------------------- lean models
# The same maths as the transformers modules, written directly: fused sdpa attention, no masks where the batch
# has no padding (every bench batch is full length), no output dataclasses, hooks or config dispatch.


class LeanBertLayer(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.attn_out, self.ln1 = nn.Linear(d, d), nn.LayerNorm(d, eps=1e-12)
        self.inter, self.out, self.ln2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d), nn.LayerNorm(d, eps=1e-12)

    def forward(self, x, mask):
        b, s, d = x.shape
        split = lambda t: t.view(b, s, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                           attn_mask=mask)
        x = self.ln1(x + self.attn_out(a.transpose(1, 2).reshape(b, s, d)))
        return self.ln2(x + self.out(F.gelu(self.inter(x))))


class LeanBert(nn.Module):
    """Post-LayerNorm BERT encoder (no pooler); forward returns the last hidden state."""

    def __init__(self, workload: str):
        super().__init__()
        layers, heads, d = ENCODERS[workload]
        self.config = BertConfig(hidden_size=d)  # Classifier reads hidden_size
        self.word, self.pos, self.types = nn.Embedding(VOCAB, d), nn.Embedding(MAX_POS, d), nn.Embedding(TYPE_VOCAB, d)
        self.ln = nn.LayerNorm(d, eps=1e-12)
        self.layers = nn.ModuleList(LeanBertLayer(d, heads) for _ in range(layers))

    def forward(self, input_ids, token_type_ids, attention_mask):
        s = input_ids.shape[1]
        x = self.ln(self.word(input_ids) + self.pos.weight[:s] + self.types(token_type_ids))
        mask = None if bool(attention_mask.all()) else attention_mask[:, None, None, :].bool()
        for layer in self.layers:
            x = layer(x, mask)
        return LastHidden(x)


class LastHidden:
    def __init__(self, h):
        self.last_hidden_state = h


def rms_norm(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def t5_bucket(rel, bidirectional: bool, buckets: int = 32, max_distance: int = 128):
    """transformers' T5Attention._relative_position_bucket."""
    out = torch.zeros_like(rel)
    if bidirectional:
        buckets //= 2
        out += (rel > 0).long() * buckets
        rel = rel.abs()
    else:
        rel = -torch.clamp(rel, max=0)
    exact = buckets // 2
    large = exact + (torch.log(rel.float().clamp_min(1) / exact) / math.log(max_distance / exact)
                     * (buckets - exact)).long()
    large = torch.clamp(large, max=buckets - 1)
    return out + torch.where(rel < exact, rel, large)


class LeanT5Attn(nn.Module):
    def __init__(self, d: int, d_kv: int, heads: int):
        super().__init__()
        self.heads, self.d_kv = heads, d_kv
        inner = heads * d_kv
        self.q, self.k, self.v = (nn.Linear(d, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, d, bias=False)

    def forward(self, x, kv, bias):
        b = x.shape[0]
        split = lambda t: t.view(b, -1, self.heads, self.d_kv).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(kv)), split(self.v(kv))
        # T5 does not scale the scores: scale=1
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype), scale=1.0)
        return self.o(a.transpose(1, 2).reshape(b, x.shape[1], -1))


class LeanT5Block(nn.Module):
    def __init__(self, d, d_kv, heads, d_ff, decoder: bool):
        super().__init__()
        self.self_attn, self.ln_self = LeanT5Attn(d, d_kv, heads), nn.Parameter(torch.ones(d))
        self.cross = LeanT5Attn(d, d_kv, heads) if decoder else None
        self.ln_cross = nn.Parameter(torch.ones(d)) if decoder else None
        self.wi_0, self.wi_1 = nn.Linear(d, d_ff, bias=False), nn.Linear(d, d_ff, bias=False)
        self.wo, self.ln_ff = nn.Linear(d_ff, d, bias=False), nn.Parameter(torch.ones(d))

    def forward(self, x, bias, enc=None):
        h = rms_norm(x, self.ln_self)
        x = x + self.self_attn(h, h, bias)
        if self.cross is not None:
            x = x + self.cross(rms_norm(x, self.ln_cross), enc, None)
        h = rms_norm(x, self.ln_ff)
        return x + self.wo(F.gelu(self.wi_0(h), approximate="tanh") * self.wi_1(h))


class LeanT5(nn.Module):
    """T5 (pre-RMSNorm, relative position bias from block 0 of each stack, gated-GELU, untied head)."""

    def __init__(self, workload: str):
        super().__init__()
        vocab, d, d_kv, heads, d_ff, layers = T5S[workload]
        self.shared = nn.Embedding(vocab, d)
        self.enc_bias, self.dec_bias = nn.Embedding(32, heads), nn.Embedding(32, heads)
        self.encoder = nn.ModuleList(LeanT5Block(d, d_kv, heads, d_ff, False) for _ in range(layers))
        self.decoder = nn.ModuleList(LeanT5Block(d, d_kv, heads, d_ff, True) for _ in range(layers))
        self.enc_ln, self.dec_ln = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def position_bias(self, table, q_len, k_len, bidirectional):
        rel = torch.arange(k_len)[None, :] - torch.arange(q_len)[:, None]
        bias = table(t5_bucket(rel, bidirectional)).permute(2, 0, 1)[None]  # [1, heads, q, k]
        if not bidirectional:
            bias = bias.masked_fill(torch.ones(q_len, k_len, dtype=torch.bool).triu(1), float("-inf"))
        return bias

    def forward(self, input_ids, attention_mask, labels):
        x = self.shared(input_ids)
        s, t = input_ids.shape[1], labels.shape[1]
        bias = self.position_bias(self.enc_bias, s, s, True)
        if not bool(attention_mask.all()):
            bias = bias.masked_fill(attention_mask[:, None, None, :] == 0, float("-inf"))
        for blk in self.encoder:
            x = blk(x, bias)
        enc = rms_norm(x, self.enc_ln)
        dec_in = torch.cat([torch.zeros_like(labels[:, :1]), labels[:, :-1].clamp_min(0)], 1)  # shift right
        y = self.shared(dec_in)
        dbias = self.position_bias(self.dec_bias, t, t, False)
        for blk in self.decoder:
            y = blk(y, dbias, enc)
        logits = self.lm_head(rms_norm(y, self.dec_ln))
        return LossOut(F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1)), logits)


class LossOut:
    def __init__(self, loss, logits):
        self.loss, self.logits = loss, logits


def rope(x, cos, sin):
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], -1)
    return x * cos + rot * sin


class LeanLlamaLayer(nn.Module):
    def __init__(self, d, heads, kv, inter):
        super().__init__()
        self.heads, self.kv, self.hd = heads, kv, d // heads
        self.q_proj, self.o_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.k_proj, self.v_proj = nn.Linear(d, kv * self.hd, bias=False), nn.Linear(d, kv * self.hd, bias=False)
        self.gate_proj, self.up_proj = nn.Linear(d, inter, bias=False), nn.Linear(d, inter, bias=False)
        self.down_proj = nn.Linear(inter, d, bias=False)
        self.ln1, self.ln2 = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))

    def forward(self, x, cos, sin):
        b, s, d = x.shape
        h = rms_norm(x, self.ln1)
        q = rope(self.q_proj(h).view(b, s, self.heads, self.hd).transpose(1, 2), cos, sin)
        k = rope(self.k_proj(h).view(b, s, self.kv, self.hd).transpose(1, 2), cos, sin)
        v = self.v_proj(h).view(b, s, self.kv, self.hd).transpose(1, 2)
        # KV heads repeated for their query heads, as transformers' sdpa path does
        g = self.heads // self.kv
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, s, d))
        h = rms_norm(x, self.ln2)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class LeanLlama(nn.Module):
    """Llama (pre-RMSNorm, RoPE, grouped KV heads, SwiGLU, untied head); loss on the labels != -100."""

    def __init__(self, workload: str):
        super().__init__()
        vocab, d, heads, kv, inter, layers = LLAMAS[workload]
        self.hd = d // heads
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(LeanLlamaLayer(d, heads, kv, inter) for _ in range(layers))
        self.norm, self.lm_head = nn.Parameter(torch.ones(d)), nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids, attention_mask, labels, logits_to_keep=0):
        s = input_ids.shape[1]
        inv = 1.0 / (10000.0 ** (torch.arange(0, self.hd, 2, dtype=torch.float32) / self.hd))
        ang = torch.arange(s, dtype=torch.float32)[:, None] * inv[None]
        ang = torch.cat([ang, ang], -1)
        x = self.embed_tokens(input_ids)
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        if logits_to_keep:  # as transformers: the head on the last positions only, labels given for those
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(rms_norm(x, self.norm))
        # labels shifted left (padded with -100) instead of the logits sliced: no copy of the [b, s, vocab] logits
        shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
        return LossOut(F.cross_entropy(logits.float().view(-1, logits.shape[-1]), shifted.reshape(-1)), logits)


LEAN_NAMES = {  # transformers parameter name (regex) -> lean module's name
    "bert": [(r"embeddings\.word_embeddings", "word"), (r"embeddings\.position_embeddings", "pos"),
             (r"embeddings\.token_type_embeddings", "types"), (r"embeddings\.LayerNorm", "ln"),
             (r"encoder\.layer\.(\d+)\.attention\.self\.", r"layers.\1."),
             (r"encoder\.layer\.(\d+)\.attention\.output\.dense", r"layers.\1.attn_out"),
             (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm", r"layers.\1.ln1"),
             (r"encoder\.layer\.(\d+)\.intermediate\.dense", r"layers.\1.inter"),
             (r"encoder\.layer\.(\d+)\.output\.dense", r"layers.\1.out"),
             (r"encoder\.layer\.(\d+)\.output\.LayerNorm", r"layers.\1.ln2")],
    "t5": [(r"encoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias", "enc_bias"),
           (r"decoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias", "dec_bias"),
           (r"(encoder|decoder)\.block\.(\d+)\.layer\.0\.SelfAttention", r"\1.\2.self_attn"),
           (r"(encoder|decoder)\.block\.(\d+)\.layer\.0\.layer_norm\.weight", r"\1.\2.ln_self"),
           (r"decoder\.block\.(\d+)\.layer\.1\.EncDecAttention", r"decoder.\1.cross"),
           (r"decoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight", r"decoder.\1.ln_cross"),
           (r"(encoder|decoder)\.block\.(\d+)\.layer\.\d\.DenseReluDense", r"\1.\2"),
           (r"(encoder|decoder)\.block\.(\d+)\.layer\.\d\.layer_norm\.weight", r"\1.\2.ln_ff"),
           (r"encoder\.final_layer_norm\.weight", "enc_ln"), (r"decoder\.final_layer_norm\.weight", "dec_ln")],
    "llama": [(r"model\.embed_tokens", "embed_tokens"), (r"model\.norm\.weight", "norm"),
              (r"model\.layers\.(\d+)\.(self_attn|mlp)\.", r"layers.\1."),
              (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.ln1"),
              (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.ln2")],
}


def lean_from_transformers(workload: str):
    """(transformers model, lean model holding the same weights) of the workload's shape."""
    import re

    fam = family(workload)
    torch.manual_seed(0)
    hf = make_bert(workload, "sdpa") if fam == "bert" else make_generative(workload, "sdpa")
    lean = {"bert": LeanBert, "t5": LeanT5, "llama": LeanLlama}[fam](workload)
    state = {}
    for name, t in hf.state_dict().items():
        if name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight") or "position_ids" in name:
            continue  # T5's stacks share `shared`; BERT's position-id buffer
        new = name
        for pat, rep in LEAN_NAMES[fam]:
            new = re.sub("^" + pat, rep, new)
        state[new] = t
    lean.load_state_dict(state, strict=True)
    return hf, lean


def check_lean(workload: str) -> float:
    """Copy a transformers model's weights into the lean one and return the largest difference of their
    outputs (BERT: last hidden state; T5, Llama: logits and loss) on a random batch, relative to the largest
    output."""
    fam = family(workload)
    hf, lean = lean_from_transformers(workload)
    hf.eval()
    gen = torch.Generator().manual_seed(1)
    vocab = WORKLOADS[workload][0] if fam != "bert" else VOCAB
    ids = torch.randint(2, vocab, (BATCH, SEQ), generator=gen)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        if fam == "bert":
            types = torch.zeros_like(ids)
            a = hf(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
            b = lean(ids, types, mask).last_hidden_state
        else:
            cls = torch.randint(0, CLASSES, (BATCH,), generator=gen)
            answer = torch.stack([ANSWER0 + cls, torch.full_like(cls, 1 if fam == "t5" else 2)], 1)
            tgt = answer
            if fam == "llama":
                ids = torch.cat([ids, answer], 1)
                mask = torch.ones_like(ids)
                tgt = torch.cat([torch.full((BATCH, SEQ), -100), answer], 1)
            x, y = hf(input_ids=ids, attention_mask=mask, labels=tgt), lean(input_ids=ids, attention_mask=mask, labels=tgt)
            a, b = torch.cat([x.logits.flatten(), x.loss[None]]), torch.cat([y.logits.flatten(), y.loss[None]])
            if fam == "llama":  # the timed call: the head only at the positions that predict the answer
                k = answer.shape[1] + 1
                kw = dict(input_ids=ids, attention_mask=mask, labels=tgt[:, -k:], logits_to_keep=k)
                xk, yk = hf(**kw), lean(**kw)
                a = torch.cat([a, xk.logits.flatten(), xk.loss[None], x.loss[None]])
                b = torch.cat([b, yk.logits.flatten(), yk.loss[None], xk.loss[None]])
    return float((a - b).abs().max() / a.abs().max())


# ----------------------------------------------------------------------------------------------- timing


def cpu_snapshot():
    """(wall s, system-wide busy CPU s from /proc/stat, this process's CPU s)."""
    busy = float("nan")
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...; idle + iowait are not busy
        busy = (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system


def other_load(a, b):
    """Average number of cores busy with OTHER processes between two cpu_snapshot()s."""
    wall = b[0] - a[0]
    return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / wall) if wall > 0 else float("nan")


LOAD_THRESHOLD = 0.2  # cores used by other processes above which a timing counts as contaminated


def wait_idle(max_wait_s: float, threshold: float = LOAD_THRESHOLD, say=lambda *a: None):
    """Wait (up to max_wait_s) until other processes use < threshold cores over a 1 s window."""
    start = time.perf_counter()
    last_say = start
    while True:
        a = cpu_snapshot()
        time.sleep(1.0)
        load = other_load(a, cpu_snapshot())
        now = time.perf_counter()
        if not load >= threshold or now - start > max_wait_s:  # nan -> proceed
            return load
        if now - last_say >= 15:
            last_say = now
            say(f"# waited {now - start:.0f} s: other processes use {load:.2f} cores")


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux; process-wide high-water mark (never goes down).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_config(workload, attn, mode, n, impl, bf16, threads, warmup, iters, lean=False):
    model = build(workload, attn, mode, n, impl, lean)
    gen = torch.Generator().manual_seed(1)
    fam = family(workload)
    if fam == "bert":
        ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=gen)
        types = torch.zeros(BATCH, SEQ, dtype=torch.long)
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)  # all sequences full length
        labels = torch.randint(0, CLASSES, (BATCH,), generator=gen)
        run = lambda: model(ids, types, mask)  # noqa: E731
    else:
        # rank classification: prompts of SEQ random tokens, the gold class's 2-token answer as the target
        vocab = WORKLOADS[workload][0]
        ids = torch.randint(2, vocab, (BATCH, SEQ), generator=gen)
        cls = torch.randint(0, CLASSES, (BATCH,), generator=gen)
        answer = torch.stack([ANSWER0 + cls, torch.full_like(cls, 1 if fam == "t5" else 2)], 1)
        if fam == "t5":  # encoder: the prompt; decoder target: the answer
            tgt = answer
        else:  # prompt ‖ answer, loss on the answer tokens only
            ids = torch.cat([ids, answer], 1)
            tgt = torch.cat([torch.full((BATCH, SEQ), -100), answer], 1)
        mask = torch.ones_like(ids)
        # Llama: the LM head only at the 3 last positions (the two that predict the answer tokens, and the last,
        # whose label shifts out), transformers' `logits_to_keep`, as loracomp runs its head only where a loss
        # term is; `--check-lean` checks this loss equals the full-logit one
        kw = {"logits_to_keep": answer.shape[1] + 1} if fam == "llama" else {}
        if kw:
            tgt = tgt[:, -kw["logits_to_keep"]:]
        run = lambda: model(input_ids=ids, attention_mask=mask, labels=tgt, **kw).loss  # noqa: E731
    amp = (
        torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    )

    # A rank classifier has no head: under `uniform` (bank merged once) nothing trains, and the step is the
    # merged model's loss, forward only, as loracomp's uniform method evaluates it.
    if mode == "forward" or (mode == "uniform" and fam != "bert"):

        def step():
            with torch.inference_mode(), amp:
                run()

    else:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

        def step():
            opt.zero_grad(set_to_none=True)
            with amp:
                out = run()
            loss = F.cross_entropy(out.float(), labels) if fam == "bert" else out.float()
            loss.backward()
            opt.step()

    times = []
    for it in range(warmup + iters):
        if it == warmup:
            snap0 = cpu_snapshot()
        t0 = time.perf_counter()
        step()
        dt = (time.perf_counter() - t0) * 1e3
        if it >= warmup:
            times.append(dt)
    load = other_load(snap0, cpu_snapshot())

    name = (impl.replace("torch", "lean") if lean else impl) + ("-eager" if attn == "eager" else "") \
        + ("-bf16" if bf16 else "")
    res = {
        "impl": name,
        "workload": workload,
        "mode": mode,
        "n_adapters": n,
        "batch": BATCH,
        "seq": SEQ,
        "threads": threads,
        "dtype": "bf16" if bf16 else "f32",
        "median_ms": round(statistics.median(times), 3),
        "min_ms": round(min(times), 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "torch": torch.__version__,
        "attn": attn,
        # cores used by other processes during the timed iterations (contention check; ~0 on a quiet box)
        "other_load": round(load, 2),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad) if mode != "forward" else 0,
    }
    del model
    gc.collect()
    return res


def configs(args):
    for w in args.workloads:
        for attn in args.attn:
            for mode in args.modes:
                ns = args.n if mode in ("uniform", "learned") else [0]
                impls = LEARNED_IMPLS if mode == "learned" else ["torch"]
                impls = [i for i in impls if args.impls is None or i in args.impls]
                for n in ns:
                    for impl in impls:
                        yield w, attn, mode, n, impl


def csv(s):
    return [x for x in s.split(",") if x]


def time_matmuls(args):
    """Best-of-iters time of torch.matmul alone at each MxKxN shape, one JSON line each."""
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    for spec in args.matmul:
        try:
            m, k, n = (int(x) for x in spec.lower().split("x"))
        except ValueError:
            sys.exit(f"--matmul: {spec!r} is not MxKxN")
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(args.warmup):
            torch.matmul(a, b)
        best = float("inf")
        for _ in range(args.iters):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - t0)
        print(json.dumps({"impl": "torch-matmul", "m": m, "k": k, "n": n, "dtype": str(dtype).split(".")[-1],
                          "threads": torch.get_num_threads(), "best_ms": best * 1e3,
                          "gflops": 2 * m * k * n / best / 1e9}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", type=csv, default=None, help="comma list of " + ",".join(WORKLOADS) + " (default minilm,ref4)")
    ap.add_argument("--modes", type=csv, default=None, help="comma list of " + ",".join(MODES) + " (default all)")
    ap.add_argument("--n", type=lambda s: [int(x) for x in csv(s)], nargs="+", default=None,
                    help="bank sizes for uniform/learned, e.g. --n 8 64 or --n 1,8,64,128 (default 8 64)")
    ap.add_argument("--attn", type=csv, default=None, help="attention impls: sdpa,eager (default both)")
    ap.add_argument("--impls", type=csv, default=None,
                    help="restrict to these impls: torch,torch-fair,torch-authors (default all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=None, help="default 3")
    ap.add_argument("--iters", type=int, default=None, help="default 10")
    ap.add_argument("--bf16", action="store_true", help="run steps under torch.autocast('cpu', bfloat16)")
    ap.add_argument("--smoke", action="store_true", help="iters 2, warmup 1, the tiny workloads (tiny,t5tiny,llamatiny), learned N=2, sdpa")
    ap.add_argument("--isolate", action="store_true",
                    help="run every config in a fresh process (so peak_rss_mb is per config, not cumulative)")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECS",
                    help="before each config wait up to SECS until other processes use < 0.2 cores")
    ap.add_argument("--retries", type=int, default=None,
                    help="rerun a config whose timing had other_load > 0.2 up to this many times "
                         "(default 2 with --wait-idle, else 0)")
    ap.add_argument("--lean", action="store_true",
                    help="hand-written torch modules instead of transformers' (impl torch… becomes lean…; sdpa only)")
    ap.add_argument("--check-lean", action="store_true",
                    help="only check that each lean model computes what its transformers model does (same weights)")
    ap.add_argument("--json", action="store_true", help="print JSON lines only")
    ap.add_argument("--matmul", type=csv, default=None, metavar="MxKxN,...",
                    help="only time torch.matmul of [M,K]x[K,N] f32 (bf16 with --bf16) at these shapes, best of "
                         "--iters (the products alone, beside `loracomp bench --shapes`)")
    args = ap.parse_args()

    def dflt(name, normal, smoke):
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else normal)

    dflt("workloads", ["minilm", "ref4"], ["tiny", "t5tiny", "llamatiny"])
    dflt("modes", list(MODES), ["learned"])
    dflt("n", [[8, 64]], [[2]])
    dflt("attn", ["sdpa"] if args.lean else list(ATTNS), ["sdpa"])
    dflt("warmup", 3, 1)
    dflt("iters", 10, 2)
    args.n = [x for group in args.n for x in group]
    if args.retries is None:
        args.retries = 2 if args.wait_idle > 0 else 0
    for w in args.workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}")
    for m in args.modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}")
    for a in args.attn:
        if a not in ATTNS:
            ap.error(f"unknown attention impl {a!r}")
    if args.lean and args.attn != ["sdpa"]:
        ap.error("--lean models use sdpa attention only: give --attn sdpa")

    torch.set_num_threads(args.threads)
    if args.matmul:
        time_matmuls(args)
        return
    if args.check_lean:
        for w in args.workloads:
            diff = check_lean(w)
            print(f"{w}: lean vs transformers, largest output difference {diff:.2e} (relative to the largest output)")
            if not diff < 1e-4:
                sys.exit(f"{w}: the lean model differs from transformers by {diff}")
        return
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    say(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, cpu capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {platform.processor() or platform.machine()}, "
        f"batch {BATCH} x seq {SEQ}, warmup {args.warmup}, iters {args.iters}, {'bf16 autocast' if args.bf16 else 'f32'}")

    results = []
    for w, attn, mode, n, impl in configs(args):
        if args.isolate:
            # the child waits for idle and retries itself, right before its timing
            cmd = [sys.executable, os.path.abspath(__file__), "--json", "--workloads", w, "--attn", attn,
                   "--modes", mode, "--n", str(n if n else 1), "--impls", impl, "--threads", str(args.threads),
                   "--warmup", str(args.warmup), "--iters", str(args.iters), "--wait-idle", str(args.wait_idle),
                   "--retries", str(args.retries)] + (["--bf16"] if args.bf16 else []) \
                + (["--lean"] if args.lean else [])
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
        else:
            for attempt in range(args.retries + 1):
                if args.wait_idle > 0:
                    wait_idle(args.wait_idle, say=say)
                res = run_config(w, attn, mode, n, impl, args.bf16, args.threads, args.warmup, args.iters,
                                 args.lean)
                if not res["other_load"] > LOAD_THRESHOLD:
                    break
                say(f"# {res['impl']} {w} {mode} N={n}: other_load {res['other_load']:.2f} during timing"
                    + (", retrying" if attempt < args.retries else ", giving up (result kept)"))
        results.append(res)
        print(json.dumps(res), flush=True)

    if not args.json and results:
        say("\n| impl | workload | mode | N | dtype | median ms | min ms | peak RSS MB | other load |")
        say("|---|---|---|---:|---|---:|---:|---:|---:|")
        for r in results:
            say(f"| {r['impl']} | {r['workload']} | {r['mode']} | {r['n_adapters']} | {r['dtype']} | "
                f"{r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['peak_rss_mb']:.0f} | {r['other_load']:.2f} |")
        if any(r["other_load"] > LOAD_THRESHOLD for r in results):
            say("# WARNING: other processes were using CPU during some timings (other_load > 0.2); rerun on a quiet "
                "machine or with --wait-idle")


if __name__ == "__main__":
    main()
