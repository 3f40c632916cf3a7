"""The model card (README.md of the model directory), written from measured numbers only."""

from __future__ import annotations

NUMBERS = "atoll_card.json"


def _hours(seconds: float) -> str:
    minutes = seconds / 60
    return f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.2f} h"


def render(numbers: dict) -> str:
    """Markdown with a Hugging Face front matter; every figure comes from ``numbers``."""
    config = numbers["config"]
    arch = config["model"]
    train = config["train"]
    corpus = numbers["corpus"]
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "license: cc-by-2.5",
        "language: en",
        "---",
        "",
        f"# {numbers['name']}",
        "",
        f"A Llama-architecture causal LM of {numbers['parameters']:,} parameters with its own byte-level BPE tokenizer "
        f"({numbers['vocab_size']:,} tokens), pretrained from scratch on a CPU by `atoll pretrain` on open English text. "
        "It loads with plain transformers:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        "model = AutoModelForCausalLM.from_pretrained(PATH)  # fp16 weights",
        "tokenizer = AutoTokenizer.from_pretrained(PATH)",
        "```",
        "",
        "## Architecture",
        "",
        f"hidden {arch['hidden_size']}, {arch['layers']} layers, {arch['heads']} attention heads ({arch['kv_heads']} key/value heads), "
        f"MLP {arch['intermediate_size']}, context up to {arch['max_position']} tokens (trained at {train['seq_len']}), "
        f"{'tied' if arch['tie_embeddings'] else 'separate'} input and output embeddings; weights stored in fp16.",
        "",
        "## Training",
        "",
        f"- {numbers['steps']:,} AdamW steps of {train['batch_size']} x {train['seq_len']} tokens: {numbers['tokens_seen']:,} tokens seen, "
        f"{numbers['epochs']:.2f} passes over the {numbers['train_tokens']:,} training tokens",
        f"- learning rate {train['lr']} (warm-up {train['warmup_steps']} steps, cosine to {train['lr'] * train['min_lr_ratio']:.2g}), "
        f"weight decay {train['weight_decay']}, gradient clipping {train['max_grad_norm']}, seed {numbers['seed']}",
        f"- wall time of the training loop: {_hours(numbers['train_wall_seconds'])} with {numbers['threads']} torch thread(s) "
        f"on {numbers['machine']} (a machine shared with other jobs; torch {numbers['torch']})",
        f"- final training loss {numbers['final_train_loss']:.3f}",
        "",
        "## Evaluation (held-out corpus chunks, never trained on)",
        "",
        "| measure | value |",
        "|---|---|",
        f"| held-out perplexity | {numbers['heldout_perplexity']:.2f} |",
        f"| unigram model of the training tokens, same targets | {numbers['unigram_perplexity']:.2f} |",
        f"| vocabulary size (perplexity of a uniform guess) | {numbers['vocab_size']:,} |",
        f"| held-out next-token accuracy | {numbers['heldout_token_accuracy']:.3f} |",
        f"| held-out tokens scored | {numbers['heldout_tokens']:,} |",
        "",
        "Perplexity is per token of this model's own tokenizer, so it is not comparable across tokenizers.",
        "",
        "## Corpus",
        "",
        f"{corpus['train_characters']:,} characters of training text and {corpus['heldout_characters']:,} held out "
        f"({corpus['heldout_fraction']:.0%} of chunks of about 2,000 characters, chosen by a hash of their text). "
        "Sources and licenses:",
        "",
        "| source | what | license | characters |",
        "|---|---|---|---|",
    ]
    for source in corpus["sources"]:
        lines.append(f"| {source['name']} | {source['origin']} | {source['license']} | {source['characters']:,} |")
    for source in corpus.get("skipped", []):
        lines.append(f"| {source['name']} | not installed, skipped (`{source['install']}`) | | 0 |")
    lines += [
        "",
        "The Shakespeare plays of atoll's Shakespeare-roles benchmark (Hamlet, Othello, Romeo and Juliet, Twelfth Night, "
        "both editions) are not in the corpus. The weights are released under CC-BY 2.5, with attribution to the Open "
        "Knowledge Foundation's Open Shakespeare texts, and under the terms of the other sources above.",
        "",
        "## Continuations (greedy, then sampled at temperature 0.8, top-k 40)",
        "",
    ]
    for sample in numbers["samples"]:
        lines += [
            f"**{sample['prompt']!r}**",
            "",
            f"- greedy: {sample['greedy']!r}",
            f"- sampled: {sample['sampled']!r}",
            "",
        ]
    lines += [
        "## Rebuild",
        "",
        "```bash",
        numbers["command"],
        "```",
        "",
        "The same command on the same corpus, seed and thread count reproduces these weights; run again after a kill, it "
        "resumes from its last checkpoint in the work directory.",
        "",
    ]
    return "\n".join(lines)
