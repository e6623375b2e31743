#!/usr/bin/env python3
"""Write a tiny random-weight llama-architecture GGUF model that llama.cpp's llama-server loads.

    python tests/tools/tiny_gguf.py OUT.gguf [--ctx 2048] [--embd 512 --layers 8 --ff 2048]

Nothing is downloaded and nothing is committed: the tests and the benchmark generate the model at
run time (the default is 387 KB and takes a fraction of a second). It is useless as a language
model but real for a real engine: the server loads it, tokenizes, applies the chat template,
samples and streams tokens.

By construction:

* the tokenizer is a GPT-2 style byte-level BPE of 106 tokens: three control tokens
  (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``), printable ASCII, ``\\n``, ``\\t`` and a
  few merges. Other input bytes are dropped; the output is always printable ASCII;
* a ChatML chat template is embedded (llama-server's Jinja mode is on by default);
* unless ``allow_eos``, a control token can never be sampled, so every request generates exactly
  ``max_tokens`` tokens and ends with ``finish_reason: "length"``: token counts are deterministic.

Needs ``gguf`` and ``numpy`` (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONTROL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MERGES = (("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("Ġ", "a"))


@dataclass(frozen=True)
class Shape:
    layers: int = 2
    embd: int = 64
    heads: int = 4
    ff: int = 128
    ctx: int = 256


#: The default: about 10,000 tokens/s on one CPU thread.
TINY = Shape()
#: 135 MB, about 7 ms per token on one thread: GPU-like pacing for streams and cancellation.
PACED = Shape(layers=8, embd=512, ff=2048)


def _vocab() -> tuple[list[str], list[int], list[str]]:
    import gguf
    from gguf.vocab import bytes_to_unicode

    byte_char = bytes_to_unicode()
    tokens = list(CONTROL)
    types = [gguf.TokenType.CONTROL] * len(CONTROL)
    for b in (9, 10, *range(0x20, 0x7F)):
        tokens.append(byte_char[b])
        types.append(gguf.TokenType.NORMAL)
    for left, right in MERGES:
        tokens.append(left + right)
        types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types], [f"{left} {right}" for left, right in MERGES]


def write_model(
    out: str | Path, shape: Shape = TINY, *, seed: int = 0, allow_eos: bool = False, name: str = "tiny-random-llama"
) -> Path:
    """Write the model to ``out`` and return its path."""
    import gguf
    import numpy as np

    tokens, types, merges = _vocab()
    n_vocab, d, ff = len(tokens), shape.embd, shape.ff
    if d % shape.heads:
        raise ValueError(f"embd {d} is not a multiple of heads {shape.heads}")
    rng = np.random.default_rng(seed)

    def normal(*dims: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(dims) * scale).astype(np.float32)

    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(name)
    w.add_context_length(shape.ctx)
    w.add_embedding_length(d)
    w.add_block_count(shape.layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.heads)
    w.add_rope_dimension_count(d // shape.heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(CONTROL.index("<|endoftext|>"))
    w.add_eos_token_id(CONTROL.index("<|im_end|>"))  # ends a chat turn
    w.add_eot_token_id(CONTROL.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    # numpy shapes are ggml's dimensions reversed: a matrix is (rows = out, cols = in).
    # Residual channel 0 is a constant 1 in every token embedding and no layer writes to it (row 0
    # of each output projection is zero), so after the final RMSNorm it is positive. Giving the
    # control tokens a huge negative weight on channel 0 means they are never sampled.
    emb = normal(n_vocab, d)
    emb[:, 0] = 1.0
    w.add_tensor("token_embd.weight", emb)
    for i in range(shape.layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(d, np.float32))
        for m in ("attn_q", "attn_k", "attn_v"):
            w.add_tensor(p + m + ".weight", normal(d, d, scale=d**-0.5))
        wo = normal(d, d, scale=d**-0.5)
        wo[0, :] = 0.0
        w.add_tensor(p + "attn_output.weight", wo)
        w.add_tensor(p + "ffn_norm.weight", np.ones(d, np.float32))
        w.add_tensor(p + "ffn_gate.weight", normal(ff, d, scale=d**-0.5))
        w.add_tensor(p + "ffn_up.weight", normal(ff, d, scale=d**-0.5))
        down = normal(d, ff, scale=ff**-0.5)
        down[0, :] = 0.0
        w.add_tensor(p + "ffn_down.weight", down)
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    head = normal(n_vocab, d, scale=0.3)
    head[:, 0] = 0.0
    if not allow_eos:
        head[: len(CONTROL), 0] = -1000.0
    w.add_tensor("output.weight", head)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=TINY.layers)
    ap.add_argument("--embd", type=int, default=TINY.embd)
    ap.add_argument("--heads", type=int, default=TINY.heads)
    ap.add_argument("--ff", type=int, default=TINY.ff)
    ap.add_argument("--ctx", type=int, default=TINY.ctx)
    ap.add_argument("--allow-eos", action="store_true", help="let the model end a reply by itself")
    args = ap.parse_args(argv)
    shape = Shape(layers=args.layers, embd=args.embd, heads=args.heads, ff=args.ff, ctx=args.ctx)
    path = write_model(args.out, shape, seed=args.seed, allow_eos=args.allow_eos)
    print(f"wrote {path} ({path.stat().st_size} bytes): {shape}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
