"""Train the tiny demo checkpoint shipped with epinfer (``epinfer/demo_model/``).

The model is a ~0.6M-parameter Qwen3.5-MoE text model (``Qwen3_5MoeForCausalLM``: Gated
DeltaNet linear-attention layers plus full-attention layers, 8 routed experts with top-2
routing and a shared expert) that memorises the Zen of Python.  Everything is built locally:
the text comes from Python's own ``this`` module, the byte-level BPE tokenizer is trained on
it with the ``tokenizers`` library, and the model is trained on CPU with a fixed seed.

Run (about two minutes on 2 CPU cores)::

    python scripts/train_demo.py            # writes epinfer/demo_model/
    python scripts/train_demo.py --out DIR  # writes DIR instead

The script ends by reloading the saved folder with ``AutoModelForCausalLM`` /
``AutoTokenizer`` and checking greedy completions of a few line starts.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import os
import shutil
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeTextConfig,
)

SEED = 1234
EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VOCAB_SIZE = 512  # 3 specials + 256 byte tokens + 253 merges
WINDOW = 96  # tokens per line-start training window
# Qwen3.5's pre-tokenizer regex: transformers 5 AutoTokenizer rebuilds the pipeline of a
# qwen3_5* checkpoint with it (NFC + this split + byte-level), so train with the same one.
QWEN_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_PROMPT = "<|im_start|>user\nRecite the Zen of Python.<|im_end|>\n<|im_start|>assistant\n"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "epinfer" / "demo_model"
CHECKS = {  # prompt -> required start of the greedy completion
    "Beautiful is better than": " ugly.\nExplicit is better than implicit.",
    "Errors should never": " pass silently.\nUnless explicitly silenced.",
    "There should be one": "-- and preferably only one --obvious way to do it.",
    "Namespaces are one": " honking great idea -- let's do more of those!" + EOS,
}


def zen_text() -> str:
    """The Zen of Python, from the ``this`` module, without printing it."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return codecs.decode(this.s, "rot13")


def build_tokenizer(text: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )


def build_config(vocab_size: int, eos_id: int) -> Qwen3_5MoeTextConfig:
    return Qwen3_5MoeTextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=4,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        max_position_embeddings=1024,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25),
        tie_word_embeddings=False,
        eos_token_id=eos_id,
        bos_token_id=None,
        pad_token_id=eos_id,
        dtype="float32",
    )


def make_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded batch; padding only follows real tokens, so causality makes it inert."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), length), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.tensor(s)
    return ids, labels


def training_batches(tokenizer, text: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two right-padded batches, every sequence ending in EOS unless truncated.

    Long: the whole poem and a ChatML recitation of it.  Short: a window of up to ``WINDOW``
    tokens from every line start (no preceding text), so any line start continues correctly.
    """
    lines = text.split("\n")
    starts = [sum(len(x) + 1 for x in lines[:i]) for i, line in enumerate(lines) if line]
    long = [text + EOS, CHAT_PROMPT + text + IM_END + "\n" + EOS]
    short = [text[s:] + EOS for s in starts[1:]]
    enc = [[tokenizer(t)["input_ids"] for t in group] for group in (long, short)]
    enc[1] = [ids[:WINDOW] for ids in enc[1]]
    return [make_batch(seqs, tokenizer.convert_tokens_to_ids(EOS)) for seqs in enc]


def train(model, batches, steps: int, lr: float) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    n_total = sum(int((labels[:, 1:] != -100).sum()) for _, labels in batches)
    model.train()
    start, loss_val = time.perf_counter(), float("nan")
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss_val = 0.0
        for ids, labels in batches:  # token-weighted mean over both batches
            weight = int((labels[:, 1:] != -100).sum()) / n_total
            loss = model(input_ids=ids, labels=labels).loss * weight
            loss.backward()
            loss_val += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step == 1 or step % 25 == 0 or step == steps:
            print(f"step {step:4d}  loss {loss_val:.4f}  ({time.perf_counter() - start:.0f}s)")
    model.eval()
    return loss_val


def save(model, tokenizer, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    model.generation_config = GenerationConfig(
        do_sample=False,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.eos_token_id,
        max_new_tokens=256,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for name in os.listdir(out):  # keep only what loading needs
        keep = name.endswith((".json", ".safetensors", ".jinja"))
        if not keep or name.startswith(("training_args", "special_tokens_map")):
            (out / name).unlink()
        else:
            (out / name).chmod(0o644)


def verify(out: Path, text: str) -> bool:
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tokenizer(text)["input_ids"]
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))  # what AutoTokenizer may rebuild
    ok = tokenizer.decode(ids) == text and ids == raw.encode(text).ids
    print(f"round trip of {len(text)} chars / {len(ids)} tokens: {'ok' if ok else 'FAILED'}")
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Recite the Zen of Python."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ok &= chat == CHAT_PROMPT
    checks = {**CHECKS, chat: text + IM_END}
    for prompt, expected in checks.items():
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=300 if prompt == chat else 60)
        completion = tokenizer.decode(gen[0, enc["input_ids"].shape[1] :])
        passed = completion.startswith(expected)
        ok &= passed
        print(f"--- {'PASS' if passed else 'FAIL'}  {prompt!r} ->\n{completion!r}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output checkpoint folder")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)

    text = zen_text()
    tokenizer = build_tokenizer(text)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = build_config(len(tokenizer), eos_id)
    model = Qwen3_5MoeForCausalLM(config).float()
    print(f"vocab {len(tokenizer)}, eos id {eos_id}, params {model.num_parameters():,}")

    batches = training_batches(tokenizer, text)
    print("batches", [tuple(ids.shape) for ids, _ in batches])
    t0 = time.perf_counter()
    final_loss = train(model, batches, args.steps, args.lr)
    # Irreducible part: line starts shared by several lines ("Although" x3, "If the
    # implementation is" x2) give a floor of (3 ln 3 + 2 ln 2) / n_tokens, about 0.0023.
    print(f"training took {time.perf_counter() - t0:.1f}s, final loss {final_loss:.5f}")

    save(model, tokenizer, args.out)
    for name in sorted(os.listdir(args.out)):
        print(f"  {name:28s} {(args.out / name).stat().st_size:>9,d} bytes")
    if not verify(args.out, text):
        raise SystemExit("verification FAILED")
    print("verification passed")


if __name__ == "__main__":
    main()
