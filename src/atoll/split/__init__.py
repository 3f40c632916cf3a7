"""Split learning of language models: the model is cut, a data party keeps its text, labels and
the first blocks, a model party holds the rest and never sees the raw data.

Layers (each module one concept; see docs/split.md for the full guide):

- ``partition``  the cut: head-tail or head-body-tail, and which blocks each party holds
- ``families``   how each architecture family (Llama/Qwen2/Mistral, GPT-2, BERT/RoBERTa) runs a
                 range of its blocks with a KV cache of its own
- ``slices``     a party's share of the model (PEFT LoRA, full fine-tuning or frozen per slice);
                 its adapter saves in PEFT format under the unsplit model's module names
- ``wire``, ``channel``, ``grpc_transport``, ``server``, ``process``
                 messages (named tensors + a few scalars, serialised with safetensors, every
                 byte counted), the in-process channel, and the model party over gRPC
- ``data_party``, ``model_party``   the two kinds of party; the data party drives
- ``tasks``, ``qa``   batches, losses and metrics (classification, SQuAD QA, generation)
- ``transcript``  what the model party received: the only material of attacks
- ``defenses``, ``attacks``, ``plugins``   the two seams and their registries
- ``config``, ``setup``, ``runner``, ``cli``   ``atoll split run|serve|config|list``

Seam (a), defenses (:mod:`atoll.split.defenses.base`): a defense acts at the data party, at the
channel boundary, so the model party never receives an unprotected tensor. Hooks, in the order
a step calls them: ``protect_tokens`` (text level, before the head), ``protect_embeddings``
(word embeddings), ``protect_activations`` (what is sent), ``receive`` (what came back),
``extra_loss`` (a term added to the data party's loss), ``protect_gradients`` (the gradient the
data party returns); ``modules()`` are trained by the data party's optimizer; ``report()`` adds
numbers (e.g. ε spent) to every metrics record. Register in ``plugins.DEFENSES``.

Seam (b), attacks (:mod:`atoll.split.attacks.base`): the model party is honest but curious. An
attack's ``run(transcript, knowledge)`` sees only the :class:`~atoll.split.transcript.Transcript`
(the decoded messages the model party received, selected by ``record``) and the knowledge its
config states (``Knowledge.data_model("pretrained"|"trained", party)``, ``Knowledge.auxiliary(n)``);
it returns :class:`~atoll.split.attacks.base.Guess` objects, which the harness alone scores
against the truth. Register in ``plugins.ATTACKS``.
"""
