"""TextObfuscator: make the representations of the tokens of one cluster indistinguishable, then
add noise (Zhou, Xi, Zhang, Gui, Zhang and others, "TextObfuscator: Making Pre-trained Language
Model a Privacy Protector via Obfuscating Word Representations", Findings of ACL 2023;
VFLAIR-LLM's TextObfuscator).

Tokens are clustered once by k-means on their word embeddings (the vocabulary of the data party's
own training text when it is known, else the whole table). During training a close loss pulls
each sent token representation toward its cluster's centre (a running mean of the cluster's
representations), and an away loss keeps the centres of the clusters in the batch at least
``margin`` (relative to the mean representation norm) apart, so an inverter can at best name the
cluster. Laplace noise of scale 1/ε is added to every coordinate sent, in training, evaluation
and generation.
"""

from __future__ import annotations

from pydantic import Field

from atoll.split.defenses.base import Defense, DefenseParams


class TextObfuscatorParams(DefenseParams):
    clusters: int = Field(100, gt=1, description="k of k-means over the token embeddings")
    epsilon: float = Field(10.0, gt=0, description="Laplace noise of scale 1/epsilon on what is sent (smaller: more noise)")
    close: float = Field(0.1, ge=0, description="weight of the loss pulling tokens to their cluster centre")
    away: float = Field(0.5, ge=0, description="weight of the loss pushing cluster centres apart")
    margin: float = Field(1.0, ge=0, description="away loss: wanted distance between centres, relative to the mean representation norm")
    momentum: float = Field(0.9, ge=0, lt=1, description="running-mean momentum of the cluster centres")


def kmeans(points, k: int, generator, iterations: int = 20):
    """Lloyd's k-means with k-means++ seeding; returns (centres [k, d], assignment [n])."""
    import torch

    n = points.shape[0]
    k = min(k, n)
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [points[first]]
    closest = (points - points[first]).pow(2).sum(-1)
    for _ in range(1, k):
        index = int(torch.multinomial(closest / closest.sum(), 1, generator=generator))
        centres.append(points[index])
        closest = torch.minimum(closest, (points - points[index]).pow(2).sum(-1))
    centres = torch.stack(centres)
    assignment = torch.zeros(n, dtype=torch.long)
    for _ in range(iterations):
        assignment = torch.cdist(points, centres).argmin(-1)
        sums = torch.zeros_like(centres).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=k).unsqueeze(-1)
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
    return centres, assignment


class TextObfuscator(Defense):
    name = "textobfuscator"
    paper = "Zhou et al., TextObfuscator, Findings of ACL 2023"
    summary = "cluster tokens, pull each token's sent representation to its cluster centre, push centres apart, add Laplace noise"
    Params = TextObfuscatorParams

    def __init__(self, params: TextObfuscatorParams, context):
        super().__init__(params, context)
        import torch

        from atoll.seeding import torch_generator

        table = context.word_embeddings.float()
        counts = context.token_counts() if context.token_counts is not None else None
        vocabulary = torch.arange(table.shape[0]) if counts is None else torch.from_numpy((counts > 0).nonzero()[0])
        _, assignment = kmeans(table[vocabulary], params.clusters, torch_generator(context.seed, self.name, "kmeans"))
        self.cluster_of = torch.full((table.shape[0],), -1, dtype=torch.long)
        self.cluster_of[vocabulary] = assignment
        self.centres = torch.zeros(params.clusters, context.hidden_size)
        self.seen = torch.zeros(params.clusters, dtype=torch.bool)
        self.releases = 0
        self.last = {"close": 0.0, "away": 0.0}

    def protect_activations(self, activations, mask, step, phase):
        import torch

        from atoll.seeding import torch_generator

        self.releases += 1
        generator = torch_generator(self.context.seed, self.name, self.context.party, phase, step, self.releases)
        uniform = torch.rand(activations.shape, generator=generator, dtype=torch.float64) - 0.5
        scale = 1.0 / self.params.epsilon
        noise = -scale * torch.sign(uniform) * torch.log1p(-2 * uniform.abs().clamp(max=0.5 - 1e-12))
        return activations + noise.to(activations.dtype)

    def extra_loss(self, exchange):
        import torch

        if exchange.activations.dim() != 3:
            return None
        keep = exchange.batch["attention_mask"].bool()
        hidden = exchange.activations[keep].float()  # the head's output, before the noise
        clusters = self.cluster_of[exchange.batch["input_ids"][keep]]
        known = clusters >= 0
        hidden, clusters = hidden[known], clusters[known]
        if hidden.shape[0] == 0:
            return None
        present = clusters.unique()
        sums = torch.zeros(self.params.clusters, hidden.shape[1]).index_add(0, clusters, hidden)
        counts = torch.bincount(clusters, minlength=self.params.clusters).unsqueeze(-1).float()
        batch_centres = sums[present] / counts[present]
        with torch.no_grad():
            fresh = ~self.seen[present]
            old = self.centres[present]
            updated = torch.where(
                fresh.unsqueeze(-1), batch_centres, self.params.momentum * old + (1 - self.params.momentum) * batch_centres
            )
            self.centres[present] = updated.detach()
            self.seen[present] = True
        close = (hidden - self.centres[clusters]).pow(2).sum(-1).mean()
        scale = hidden.detach().norm(dim=-1).mean()
        away = hidden.new_zeros(())
        if len(present) > 1:
            gaps = torch.pdist(batch_centres)
            away = torch.relu(self.params.margin * scale - gaps).mean()
        self.last = {"close": float(close.detach()), "away": float(away.detach())}
        return self.params.close * close / scale.pow(2).clamp_min(1e-12) + self.params.away * away / scale.clamp_min(1e-12)

    def report(self) -> dict[str, float]:
        return {"releases": float(self.releases), "noise_scale": 1.0 / self.params.epsilon, **self.last}
