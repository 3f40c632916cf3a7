"""What every algorithm is and supports, declared in one place and importable without torch.

Each :class:`AlgorithmSpec` names the algorithm, the module and class that implement it, its paper,
its parameters (a pydantic model: ``algorithm.KEY`` in a config) and its :class:`Capabilities`.
Config checks (:mod:`atoll.compat`), ``atoll list`` and the engines read these declarations; none of
them imports an algorithm's module or inspects its methods. :func:`atoll.algorithms.get_algorithm`
imports only the module of the algorithm a run chooses, so a broken module breaks only itself.

Adding an algorithm: write its module (a BaseServer subclass, plus a BaseClient subclass if the
client side changes), then add one AlgorithmSpec below; ARCHITECTURE.md walks through it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from atoll.fl.capabilities import AlgorithmSpec, Capabilities, NoParams


# -- parameters (``algorithm.KEY``), one model per algorithm that has any -------------------------


class FedAdagradParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    server_lr: float = Field(0.1, gt=0, description="server step size eta")
    beta1: float = Field(0.9, ge=0, lt=1, description="decay of the first moment m (server momentum)")
    tau: float = Field(1e-3, gt=0, description="adaptivity tau: added to sqrt(v), and v starts at tau^2")


class FedAdamParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    server_lr: float = Field(0.01, gt=0, description="server step size eta")
    beta1: float = Field(0.9, ge=0, lt=1, description="decay of the first moment m (server momentum)")
    beta2: float = Field(0.99, ge=0, lt=1, description="decay of the second moment v")
    tau: float = Field(1e-3, gt=0, description="adaptivity tau: added to sqrt(v), and v starts at tau^2")


class FedAvgMParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    server_lr: float = Field(1.0, gt=0, description="server step size eta applied to the momentum buffer")
    momentum: float = Field(0.9, ge=0, lt=1, description="server momentum beta (0 with server_lr 1 is FedAvg)")


class FedDPAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    variant: Literal["iterative", "finetune"] = Field(
        "iterative",
        description="FedDPA-T ('iterative': train the local adapter every round) or FedDPA-F ('finetune': once, from the global it is evaluated with)",
    )
    local_steps: int | None = Field(
        None,
        gt=0,
        description="optimizer steps of local-adapter training per round (or per fine-tune); default: as many as a round of global training",
    )
    train_weight: float = Field(0.5, gt=0, le=1, description="weight w of the local adapter while it trains (the frozen global gets 1 - w)")
    lambda_scale: float = Field(0.5, ge=0, description="lambda in a(x) = clip(lambda * mean cosine similarity, 0, 1)")
    reference_examples: int = Field(5, gt=0, description="local training examples whose representations a(x) compares the input with")


class FedITFineTuneParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    finetune_steps: int | None = Field(
        None, gt=0, description="optimizer steps of the personal fine-tune; default: as many as one round of local training"
    )
    finetune_lr: float | None = Field(None, gt=0, description="learning rate of the personal fine-tune; default: train.lr")


class ClusteredLoRAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    aggregation: Literal["flexlora", "hetlora"] = Field(
        "flexlora",
        description="rule inside each cluster: flexlora (dense sum, SVD to each client's rank) or hetlora (zero-padding, sparsity weights, truncation)",
    )
    warmup_rounds: int = Field(1, gt=0, description="rounds of independent local LoRA training (all clients) before clustering")
    max_clusters: int = Field(8, gt=0, description="at most this many clusters; the number is chosen by silhouette score")


class FedLEASEParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    warmup_rounds: int = Field(1, gt=0, description="rounds of independent local LoRA training (all clients) before clustering")
    max_clusters: int = Field(8, gt=0, description="at most this many clusters (experts); the number is chosen by silhouette score")


class FedMomentumParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    energy: float = Field(
        0.95,
        gt=0,
        le=1,
        description="tau: components are kept (top r in LoRA, the rest merged into the base) until their cumulative energy share reaches tau",
    )


class FedProxParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mu: float = Field(0.01, ge=0, description="weight of the proximal term mu/2 * ||w - w_global||^2 (0 gives FedIT)")


class FedRotLoRAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    strength: float = Field(
        1.0, ge=0, le=1, description="lambda: R = proj_SO((1 - lambda) I + lambda R*); 1 is the full Procrustes rotation, 0 none"
    )
    align: Literal["alternate", "A", "B"] = Field(
        "alternate", description="factor aligned to the global: A in odd rounds and B in even rounds, or always A, or always B"
    )


class FedSALoRAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    share_head: bool = Field(True, description="federate the classifier head (FedAvg); false keeps it personal beside B_k")


class FedYogiParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    server_lr: float = Field(0.01, gt=0, description="server step size eta")
    beta1: float = Field(0.9, ge=0, lt=1, description="decay of the first moment m (server momentum)")
    beta2: float = Field(0.99, ge=0, lt=1, description="decay of the second moment v")
    tau: float = Field(1e-3, gt=0, description="adaptivity tau: added to sqrt(v), and v starts at tau^2")


class FLoRAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    downlink: Literal["auto", "dense"] = Field(
        "auto",
        description="auto: send every round's stacked factors while smaller than the dense merged base, then the dense base; dense: always the dense base",
    )


class HetLoRAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weighting: Literal["norm", "norm_x_examples", "examples"] = Field(
        "norm",
        description="aggregation weights: norm = ||s_k B_k A_k||_F (the paper), norm_x_examples = n_k times that norm, examples = n_k (FedAvg)",
    )
    prune_lambda: float = Field(
        0.01, ge=0, description="weight of the tail-rank regulariser lambda * ||s B_tail A_tail||_F; 0 turns regulariser and pruning off"
    )
    prune_gamma: float = Field(
        0.9, gt=0, lt=1, description="decay factor: the tail is the last max(1, r - floor(gamma r)) ranks, removed when pruned"
    )
    min_rank: int = Field(1, ge=1, description="self-pruning never goes below this rank")


class RavanParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    heads: int = Field(4, gt=0, description="number of heads h per adapted layer")
    head_rank: int | None = Field(
        None,
        gt=0,
        description="rank r_h of each head; default: the largest with heads * r_h^2 <= lora.rank * (d + k), LoRA's parameter count",
    )


class RoLoRAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    first_factor: Literal["B", "A"] = Field(
        "B", description="factor trained in round 1 (then alternating); 'B' because PEFT starts B at zero, which gives A no gradient"
    )


class ScaffoldParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    server_lr: float = Field(1.0, gt=0, description="global step size eta_g on the averaged model change (1: FedAvg of the models)")
    control_update: Literal["option-i", "option-ii"] = Field(
        "option-i",
        description="client variate update: option-i (first local gradient at x; the default, sound with AdamW) or option-ii (from the model change, the paper's SGD choice)",
    )


# -- the algorithms -----------------------------------------------------------------------------------


SPECS: dict[str, AlgorithmSpec] = {
    spec.name: spec
    for spec in [
        AlgorithmSpec(
            name="fedit",
            module="fedit",
            server_class="FedIT",
            paper="Zhang et al., Towards Building the Federated GPT: Federated Instruction Tuning, ICASSP 2024",
            Params=NoParams,
            capabilities=Capabilities(asynchronous=True, weighted_mean=True),
        ),
        AlgorithmSpec(
            name="fedprox",
            module="fedprox",
            server_class="FedProx",
            paper="Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, Federated Optimization in Heterogeneous Networks, MLSys 2020",
            Params=FedProxParams,
            capabilities=Capabilities(asynchronous=True, weighted_mean=True),
        ),
        AlgorithmSpec(
            name="scaffold",
            module="scaffold",
            server_class="Scaffold",
            paper="Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, SCAFFOLD: Stochastic Controlled Averaging for Federated Learning, ICML 2020",
            Params=ScaffoldParams,
            capabilities=Capabilities(client_state=True),
        ),
        AlgorithmSpec(
            name="fedavgm",
            module="fedavgm",
            server_class="FedAvgM",
            paper="Hsu, Qi, Brown, Measuring the Effects of Non-Identical Data Distribution for Federated Visual Classification, arXiv:1909.06335, 2019",
            Params=FedAvgMParams,
            capabilities=Capabilities(),
        ),
        AlgorithmSpec(
            name="fedadam",
            module="fedadam",
            server_class="FedAdam",
            paper="Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, Adaptive Federated Optimization, ICLR 2021",
            Params=FedAdamParams,
            capabilities=Capabilities(),
        ),
        AlgorithmSpec(
            name="fedyogi",
            module="fedyogi",
            server_class="FedYogi",
            paper="Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, Adaptive Federated Optimization, ICLR 2021",
            Params=FedYogiParams,
            capabilities=Capabilities(),
        ),
        AlgorithmSpec(
            name="fedadagrad",
            module="fedadagrad",
            server_class="FedAdagrad",
            paper="Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, Adaptive Federated Optimization, ICLR 2021",
            Params=FedAdagradParams,
            capabilities=Capabilities(),
        ),
        AlgorithmSpec(
            name="ffa-lora",
            module="ffa_lora",
            server_class="FFALoRA",
            paper="Sun, Li, Li, Ding, Improving LoRA in Privacy-preserving Federated Learning, ICLR 2024",
            Params=NoParams,
            capabilities=Capabilities(asynchronous=True),
        ),
        AlgorithmSpec(
            name="rolora",
            module="rolora",
            server_class="RoLoRA",
            paper="Chen, Guo, Ju, Dalal, Zhu, Khisti, Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA, NeurIPS 2025",
            Params=RoLoRAParams,
            capabilities=Capabilities(),
        ),
        AlgorithmSpec(
            name="fedsa-lora",
            module="fedsa_lora",
            server_class="FedSALoRA",
            paper="Guo, Zeng, Wang, Fan, Wang, Qu, Selective Aggregation for Low-Rank Adaptation in Federated Learning, ICLR 2025",
            Params=FedSALoRAParams,
            capabilities=Capabilities(asynchronous=True, personal=True, personal_export=True, global_model=False, client_state=True),
        ),
        AlgorithmSpec(
            name="flora",
            module="flora",
            server_class="FLoRA",
            paper="Wang, Shen, He, Sun, Wang, Lyu, Li, FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank Adaptations, NeurIPS 2024",
            Params=FLoRAParams,
            capabilities=Capabilities(mixed_ranks="native"),
        ),
        AlgorithmSpec(
            name="flexlora",
            module="flexlora",
            server_class="FlexLoRA",
            paper="Bai, Chen, Qian, Yao, Li, Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client Resources, NeurIPS 2024",
            Params=NoParams,
            capabilities=Capabilities(mixed_ranks="native"),
        ),
        AlgorithmSpec(
            name="hetlora",
            module="hetlora",
            server_class="HetLoRA",
            paper="Cho, Liu, Xu, Fahrezi, Joshi, Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models, EMNLP 2024",
            Params=HetLoRAParams,
            capabilities=Capabilities(mixed_ranks="native"),
        ),
        AlgorithmSpec(
            name="fedex-lora",
            module="fedex_lora",
            server_class="FedExLoRA",
            paper="Singhal, Ponkshe, Vepakomma, FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of Foundation Models, ACL 2025",
            Params=NoParams,
            capabilities=Capabilities(),
        ),
        AlgorithmSpec(
            name="fedsvd",
            module="fedsvd",
            server_class="FedSVD",
            paper="Lee, Park, Lee, Wagner, Seong, Bocklet, Lee, Hwang, FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA, NeurIPS 2025",
            Params=NoParams,
            capabilities=Capabilities(),
        ),
        AlgorithmSpec(
            name="ilora",
            module="ilora",
            server_class="ILoRA",
            paper="Zhou, Liu, Shang, ILoRA: Federated Learning with Low-Rank Adaptation for Heterogeneous Client Aggregation, arXiv:2511.16069, 2025",
            Params=NoParams,
            capabilities=Capabilities(),
        ),
        AlgorithmSpec(
            name="fedmomentum",
            module="fedmomentum",
            server_class="FedMomentum",
            paper="Yan, Hua, Wang, Zhang, Wu, Song, Guan, FedMomentum: Preserving LoRA Training Momentum in Federated Fine-Tuning, arXiv:2603.08014, 2026",
            Params=FedMomentumParams,
            capabilities=Capabilities(),
        ),
        AlgorithmSpec(
            name="fedrot-lora",
            module="fedrot_lora",
            server_class="FedRotLoRA",
            paper="Zhang, Kim, Cha, Vikalo, FedRot-LoRA: Mitigating Rotational Misalignment in Federated LoRA, ICML 2026 (arXiv:2602.23638)",
            Params=FedRotLoRAParams,
            capabilities=Capabilities(asynchronous=True, weighted_mean=True),
        ),
        AlgorithmSpec(
            name="ravan",
            module="ravan",
            server_class="Ravan",
            paper="Raje, Askin, Jhunjhunwala, Joshi, Ravan: Multi-Head Low-Rank Adaptation for Federated Fine-Tuning, NeurIPS 2025",
            Params=RavanParams,
            capabilities=Capabilities(asynchronous=True, async_mixed_ranks=True, weighted_mean=True),
        ),
        AlgorithmSpec(
            name="feddpa",
            module="feddpa",
            server_class="FedDPA",
            paper="Yang, Long, Shen, Jiang, Blumenstein, Dual-Personalizing Adapter for Federated Foundation Models, NeurIPS 2024",
            Params=FedDPAParams,
            capabilities=Capabilities(asynchronous=True, weighted_mean=True, personal=True, client_state=True),
        ),
        AlgorithmSpec(
            name="fedlease",
            module="fedlease",
            server_class="FedLEASE",
            paper="Wang, Bian, Zhang, Xu, Adaptive LoRA Experts Allocation and Selection for Federated Fine-Tuning, NeurIPS 2025",
            Params=FedLEASEParams,
            capabilities=Capabilities(personal=True, global_model=False, client_state=True),
        ),
        AlgorithmSpec(
            name="clustered-lora",
            module="clustered_lora",
            server_class="ClusteredLoRA",
            paper="clustering as FedLEASE (Wang, Bian, Zhang, Xu, NeurIPS 2025), per cluster FlexLoRA (Bai et al., NeurIPS 2024) or HetLoRA (Cho et al., EMNLP 2024)",
            Params=ClusteredLoRAParams,
            capabilities=Capabilities(mixed_ranks="native", personal=True, personal_export=True, global_model=False, client_state=True),
        ),
        AlgorithmSpec(
            name="fedit-ft",
            module="fedit_ft",
            server_class="FedITFineTune",
            paper="Wang et al., Federated Evaluation of On-device Personalization, arXiv:1910.10252, 2019 (FedAvg + local fine-tuning), on FedIT: Zhang et al., ICASSP 2024",
            Params=FedITFineTuneParams,
            capabilities=Capabilities(asynchronous=True, weighted_mean=True, personal=True, personal_export=True, client_state=True),
        ),
        AlgorithmSpec(
            name="local-only",
            module="baselines",
            server_class="LocalOnly",
            paper="baseline: no federation",
            Params=NoParams,
            capabilities=Capabilities(
                mixed_ranks="native", asynchronous=True, personal=True, personal_export=True, global_model=False, client_state=True
            ),
        ),
        AlgorithmSpec(
            name="centralized",
            module="baselines",
            server_class="Centralized",
            paper="baseline: pooled data",
            Params=NoParams,
            capabilities=Capabilities(pooled_data=True),
        ),
    ]
}
